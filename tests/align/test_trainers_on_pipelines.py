"""Every trainer family's own loop (`train_dpo`, `train_pg`, `train_nft`, `train_backprop`) on tiny
random diffusers pipelines built in the test: LoRA adapters change and the base weights do not, the
checkpoints hold only the adapters, the run folder's model loads back with the trained weights, and an
interrupted DPO run resumes to the uninterrupted result."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import diffalign.align.backprop_losses as losses_module
from diffalign.align.backprop_config import BackpropConfig
from diffalign.align.dpo import DPOConfig, train_dpo
from diffalign.align.nft import train_nft
from diffalign.align.pg_config import PGConfig
from diffalign.align.policy_gradient import train_pg
from diffalign.align.reward_backprop import train_backprop
from diffalign.align.run_dir import WEIGHTS_FILE
from diffalign.align.tracking import read_metrics
from diffalign.models.diffusers_adapters import AdapterConfig
from diffalign.models.registry import load_model, model_image_size
from tests.align.backprop_helpers import DiffRedness, bp_config
from tests.align.helpers import config, make_pairs, store_with_preferences
from tests.align.pg_helpers import Redness, nft_config, pg_config
from tests.models.tiny_pipelines import RESOLUTION, build_sd, build_sd3, build_sdxl

BUILDERS = {
    "sd": build_sd,
    "sd-v": lambda folder: build_sd(folder, "v_prediction"),
    "sdxl": build_sdxl,
    "sd3": build_sd3,
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_pipelines")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def pipeline_pairs():
    return make_pairs(8)


def _probe(model):
    """A fixed input and the model's prediction on it (to compare a model before and after)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, *model.latent_shape), generator=g)
    t = torch.tensor([0.3, 0.7]) if model.prediction_type == "flow" else torch.tensor([300.0, 700.0])
    cond = model.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        return x, t, cond, model.predict(x, t, cond)


def _check_lora_run(run, folder, trained):
    """The run trained only LoRA weights, its checkpoints hold only them, the base weights are those of
    the pipeline folder, and `load_model(run)` predicts what the trained model predicts."""
    base = load_model(str(folder))
    lora = {n: p for n, p in trained.denoiser.named_parameters() if p.requires_grad}
    assert lora and all("lora" in n for n in lora)
    assert any(float(p.detach().abs().max()) > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at 0
    base_weights = base.denoiser.state_dict()
    for name, value in trained.denoiser.state_dict().items():
        plain = name.replace(".base_layer", "")
        if "lora" not in name and plain in base_weights:
            assert torch.equal(value, base_weights[plain]), name
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert checkpoints
    saved = load_file(str(checkpoints[-1] / WEIGHTS_FILE))
    assert set(saved) == set(lora)
    x, t, cond, expected = _probe(trained)
    reloaded = load_model(str(run))
    with torch.no_grad():
        assert torch.allclose(reloaded.predict(x, t, cond), expected, atol=1e-5)
        assert not torch.allclose(base.predict(x, t, cond), expected, atol=1e-6)


@pytest.mark.parametrize("family", BUILDERS)
def test_dpo_trains_lora_on_a_pipeline(tmp_path, pipelines, pipeline_pairs, family):
    folder = pipelines[family]
    run = tmp_path / "run"
    cfg = config(folder, steps=2, batch_size=2, lora_rank=4, beta=100.0, checkpoint_every=1)
    model = train_dpo(cfg, pipeline_pairs, run)
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    # the first step's policy equals its reference (LoRA B starts at zero): the loss is log 2
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    _check_lora_run(run, folder, model)


def test_dpo_on_a_pipeline_resumes_to_the_uninterrupted_run(tmp_path, pipelines, pipeline_pairs):
    folder = pipelines["sd"]
    cfg = config(folder, steps=3, batch_size=2, lora_rank=4, beta=100.0, checkpoint_every=1)
    whole = train_dpo(cfg, pipeline_pairs, tmp_path / "whole")
    train_dpo(cfg, pipeline_pairs, tmp_path / "parts", stop_after=1)
    resumed = train_dpo(cfg, pipeline_pairs, tmp_path / "parts", resume=True)
    for (name, a), (_, b) in zip(whole.denoiser.named_parameters(), resumed.denoiser.named_parameters()):
        if a.requires_grad:
            assert torch.allclose(a, b, atol=1e-6), name
    losses = [m["loss"] for m in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    again = [m["loss"] for m in read_metrics(tmp_path / "parts" / "metrics.jsonl")]
    assert again == pytest.approx(losses, abs=1e-6)


def test_kto_full_fine_tuning_on_a_pipeline_keeps_its_reference(tmp_path, pipelines, pipeline_pairs):
    folder = pipelines["sd3"]
    cfg = config(folder, method="kto", steps=2, batch_size=2, beta=50.0, lr=1e-3)
    model = train_dpo(cfg, pipeline_pairs, tmp_path / "run")
    x, t, cond, trained = _probe(model)
    base = load_model(str(folder))
    with torch.no_grad():
        assert torch.allclose(model.reference_predict(x, t, cond), base.predict(x, t, cond), atol=1e-6)
        assert not torch.allclose(trained, base.predict(x, t, cond), atol=1e-6)
    saved = load_file(str(sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1] / WEIGHTS_FILE))
    assert set(saved) == set(dict(model.denoiser.named_parameters()))  # every weight is trained


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_grpo_with_guidance_trains_lora_on_a_pipeline(tmp_path, pipelines, family):
    folder = pipelines[family]
    run = tmp_path / "run"
    # the ratio check of the first inner step (rho = 1 within 1e-4) runs inside the loop
    cfg = pg_config(
        folder, method="grpo", epochs=2, guidance_scale=2.0, lora_rank=4, lr=1e-3, checkpoint_every=1
    )
    model = train_pg(cfg, run, reward=Redness())
    metrics = read_metrics(run / "metrics.jsonl")
    assert len(metrics) == 2 and all(abs(m["first_step_log_ratio"]) < 1e-4 for m in metrics)
    _check_lora_run(run, folder, model)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_nft_with_guidance_trains_lora_on_a_pipeline(tmp_path, pipelines, family):
    folder = pipelines[family]
    run = tmp_path / "run"
    cfg = nft_config(folder, epochs=2, guidance_scale=2.0, lora_rank=4, lr=1e-3, checkpoint_every=1)
    model = train_nft(cfg, run, reward=Redness())
    metrics = read_metrics(run / "metrics.jsonl")
    assert len(metrics) == 2 and all(m["grad_norm"] > 0 for m in metrics)
    assert metrics[1]["kl_to_base"] > 0  # the adapters moved the guided prediction away from the base
    _check_lora_run(run, folder, model)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_draft_trains_lora_through_the_vae_on_a_pipeline(tmp_path, pipelines, family):
    folder = pipelines[family]
    run = tmp_path / "run"
    cfg = bp_config(folder, method="draft", steps=2, lora_rank=4, lr=1e-2, checkpoint_every=1, kl_weight=1.0)
    model = train_backprop(cfg, run, reward=DiffRedness())
    metrics = read_metrics(run / "metrics.jsonl")
    assert len(metrics) == 2 and all(m["grad_norm"] > 0 for m in metrics)
    # the drift penalty's base is the adapter-disabled pipeline: nothing at the start, something after
    assert metrics[0]["kl_penalty"] < 1e-10 < metrics[1]["kl_penalty"]
    _check_lora_run(run, folder, model)


def test_refl_on_a_pipeline_keeps_the_pretraining_loss_on_a_stores_images(tmp_path, pipelines, monkeypatch):
    store_with_preferences(tmp_path / "p.db")  # 16-pixel images, read at the pipeline's resolution
    seen = []
    original = losses_module.pretrain_loss

    def recording(model, unet, images, prompts, noise, t):
        seen.append(tuple(images.shape))
        return original(model, unet, images, prompts, noise, t)

    monkeypatch.setattr(losses_module, "pretrain_loss", recording)
    folder = pipelines["sd"]
    cfg = bp_config(
        folder,
        method="refl",
        steps=2,
        lora_rank=4,
        lr=1e-2,
        pretrain_data=str(tmp_path / "p.db"),
        checkpoint_every=1,
    )
    model = train_backprop(cfg, tmp_path / "run", reward=DiffRedness())
    assert seen == [(4, 3, RESOLUTION, RESOLUTION)] * 2
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(m["pretrain_loss"] > 0 and m["grad_norm"] > 0 for m in metrics)
    _check_lora_run(tmp_path / "run", folder, model)


def test_pipeline_options_reach_the_model_and_are_refused_for_tiny_models(tmp_path, pipelines, eps_model_dir):
    folder = pipelines["sd"]
    assert model_image_size(str(folder)) == RESOLUTION
    assert model_image_size(str(folder), AdapterConfig(resolution=2 * RESOLUTION)) == 2 * RESOLUTION
    with pytest.raises(ValueError, match=r"pipeline\.lora_rank"):
        DPOConfig(pipeline={"lora_rank": 4})
    with pytest.raises(ValueError, match="apply to diffusers pipelines"):
        train_dpo(config(eps_model_dir, pipeline={"dtype": "bfloat16"}), make_pairs(4), tmp_path / "tiny")
    with pytest.raises(ValueError, match="pretrain_data='world'"):
        train_backprop(
            bp_config(folder, method="refl", pretrain_weight=1.0), tmp_path / "refl", reward=DiffRedness()
        )
    # LoRA target modules come from the pipeline options
    cfg = config(
        folder, steps=1, batch_size=2, lora_rank=2, beta=100.0, pipeline={"lora_target_modules": ["to_q"]}
    )
    model = train_dpo(cfg, make_pairs(4), tmp_path / "targets")
    trained = [n for n, p in model.denoiser.named_parameters() if p.requires_grad]
    assert trained and all(".to_q." in n for n in trained)
    record = json.loads((tmp_path / "targets" / "config.json").read_text())
    assert record["config"]["pipeline"]["lora_target_modules"] == ["to_q"]
    assert isinstance(PGConfig(pipeline={"dtype": "bfloat16"}).pipeline, AdapterConfig)
    assert isinstance(BackpropConfig(pipeline={"channels_last": True}).pipeline, AdapterConfig)


def test_align_dpo_cli_on_a_pipeline_folder(tmp_path, pipelines):
    from tests.align.test_cli_align import FAST, _store, invoke

    folder = pipelines["sd"]
    store = _store(tmp_path / "prefs.db")
    out = tmp_path / "run"
    options = ["lora_rank=4", "beta=100", "pipeline.lora_target_modules=[to_q, to_v]"]
    result = invoke("dpo", "--store", store, "--out", out, "--model", folder, *FAST, *options)
    assert result.exit_code == 0, result.output
    assert (out / "model" / "model_index.json").is_file()  # a diffusers pipeline folder
    assert load_model(str(out)).latent_shape == load_model(str(folder)).latent_shape
    bad = invoke("dpo", "--store", store, "--out", tmp_path / "bad", "--model", folder, "pipeline.dtype=int8")
    assert bad.exit_code == 2 and "dtype" in bad.output


def test_online_dpo_and_spin_run_rounds_on_a_pipeline(tmp_path, pipelines):
    from diffalign.align.online_dpo import OnlineDPOConfig, train_online_dpo
    from diffalign.align.spin import SPINConfig, real_from_world, train_spin

    folder = pipelines["sd"]
    round_config = config(folder, steps=1, batch_size=2, lora_rank=4, beta=100.0, checkpoint_every=1)
    sizes = dict(rounds=2, pairs_per_round=4, sample_steps=2, sample_batch=8)
    online = OnlineDPOConfig(dpo=round_config, labeller="shapes:utility", **sizes)
    model = train_online_dpo(online, tmp_path / "online")
    assert (tmp_path / "online" / "model" / "model_index.json").is_file()
    assert len((tmp_path / "online" / "rounds.jsonl").read_text().splitlines()) == 2
    lora_b = [p for n, p in model.denoiser.named_parameters() if "lora_B" in n]
    assert any(float(p.detach().abs().max()) > 0 for p in lora_b)
    spin = SPINConfig(dpo=round_config, rounds=1, sample_steps=2)
    train_spin(spin, real_from_world(4, RESOLUTION), tmp_path / "spin")
    assert (tmp_path / "spin" / "model" / "model_index.json").is_file()
