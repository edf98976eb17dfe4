"""A run's checkpoint is a model: `load_model(RUN_DIR/checkpoints/step-N)` and `--model` accept it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from diffalign.align.policy_setup import load_policy
from diffalign.align.run_checkpoints import (
    checkpoint_run_dir,
    list_checkpoints,
    load_checkpoint_model,
    run_base,
)
from diffalign.models.diffusers_adapters.common import AdapterConfig
from diffalign.models.registry import load_model, model_image_size
from diffalign.models.tiny import TinyDiffusionModel
from tests.align.helpers import save_tiny_model


def make_run(tmp_path, lora_rank: int = 0):
    """A run folder over a 16x16 tiny model with one checkpoint at step 3 whose trainable weights (the
    whole network, or the LoRA adapters) are the base's plus noise; returns (run, checkpoint, weights)."""
    model_dir = save_tiny_model(tmp_path / "model", "epsilon")
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": str(model_dir), "lora_rank": lora_rank, "lora_alpha": float(lora_rank)}
    (run / "config.json").write_text(json.dumps({"config": config}))
    model = TinyDiffusionModel.load(model_dir)
    if lora_rank:
        model.enable_lora(lora_rank, alpha=float(lora_rank))
    trainable = {name: p for name, p in model.unet.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    weights = {
        name: (p.detach() + 0.05 * torch.randn(p.shape, generator=gen)).contiguous()
        for name, p in trainable.items()
    }
    checkpoint = run / "checkpoints" / "step-0000003"
    checkpoint.mkdir(parents=True)
    save_file(weights, str(checkpoint / "weights.safetensors"))
    (checkpoint / "state.json").write_text(json.dumps({"step": 3, "data_cursor": 0}))
    return run, checkpoint, weights


def base_and_checkpoint_outputs(run, checkpoint):
    base = load_model(json.loads((run / "config.json").read_text())["config"]["model"])
    model = load_model(str(checkpoint))
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 100])
    with torch.no_grad():
        cond_b = base.encode_prompts(["a red circle", "a blue square"])
        cond_m = model.encode_prompts(["a red circle", "a blue square"])
        return base.predict(x, t, cond_b), model.predict(x, t, cond_m), model


def test_a_checkpoint_loads_as_the_base_with_its_weights(tmp_path):
    run, checkpoint, weights = make_run(tmp_path)
    assert checkpoint_run_dir(checkpoint) == run
    assert list_checkpoints(run) == [(3, checkpoint)]
    base_out, checkpoint_out, model = base_and_checkpoint_outputs(run, checkpoint)
    state = model.unet.state_dict()
    assert set(state) == set(weights)
    for name, value in weights.items():
        torch.testing.assert_close(state[name], value)
    assert (checkpoint_out - base_out).abs().max() > 1e-4  # the checkpoint's weights are in use
    assert not model.unet.training
    assert model_image_size(str(checkpoint)) == 16


def test_a_lora_checkpoint_loads_merged_and_trains_on(tmp_path):
    run, checkpoint, _ = make_run(tmp_path, lora_rank=2)
    base_out, merged_out, model = base_and_checkpoint_outputs(run, checkpoint)
    # the adapters are folded in, as in the run's model/ folder: a plain model, every weight trainable
    assert not model.lora and not any("lora" in name for name in model.unet.state_dict())
    assert len(model.trainable_parameters()) == len(list(model.unet.parameters()))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        model.merge_lora()
    info = run_base(run)
    adapted = load_checkpoint_model(info["model"], checkpoint, 2, 2.0)
    assert adapted.lora
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 100])
    with torch.no_grad():
        adapted_out = adapted.predict(x, t, adapted.encode_prompts(["a red circle", "a blue square"]))
    torch.testing.assert_close(merged_out, adapted_out, atol=1e-5, rtol=1e-4)
    assert (merged_out - base_out).abs().max() > 1e-4
    # a new LoRA run can start from it: its reference is the checkpoint, not the run's base
    policy = load_policy(str(checkpoint), "cpu", lora_rank=2, lora_alpha=2.0, pipeline=AdapterConfig())
    assert policy.lora
    with torch.no_grad():
        cond = policy.encode_prompts(["a red circle", "a blue square"])
        torch.testing.assert_close(policy.reference_predict(x, t, cond), merged_out, atol=1e-5, rtol=1e-4)


def test_folders_that_are_not_checkpoints_are_named(tmp_path):
    run, checkpoint, _ = make_run(tmp_path)
    assert checkpoint_run_dir(run) is None
    assert checkpoint_run_dir("base") is None
    (run / "config.json").unlink()  # weights without the run record that says which base they fit
    assert checkpoint_run_dir(checkpoint) is None
    with pytest.raises(FileNotFoundError, match=r"not a run's checkpoint \(RUN_DIR/checkpoints/step-N\)"):
        load_model(str(checkpoint))


def test_sample_cli_takes_a_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from diffalign.cli import app

    _, checkpoint, _ = make_run(tmp_path)
    out = tmp_path / "grid.png"
    args = ["sample", "--model", str(checkpoint), "--prompt", "a red circle", "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
