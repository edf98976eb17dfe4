import json

import pytest
import torch

import diffalign.align.dpo as dpo_module
from diffalign.align.config_io import ConfigError, load_config
from diffalign.align.dpo import (
    DPOConfig,
    PreferenceDataError,
    draw_step,
    pair_batch,
    train_dpo,
    training_data,
)
from diffalign.align.guard import NonFiniteError
from diffalign.align.losses import diffusion_dpo_loss
from diffalign.align.run_dir import RunDirError
from diffalign.align.tracking import read_metrics
from diffalign.diffusion.protocol import Conditioning
from diffalign.models.registry import load_model
from tests.align.helpers import config, make_pairs


def _implied_noise(model, batch, x0):
    """The noise that produced x_t from x0 at t (inverting add_noise)."""
    t = batch.t.view(-1, 1, 1, 1)
    if model.prediction_type == "flow":
        return (batch.x_t - (1 - t) * x0) / t
    abar = model.schedule.alpha_bar(batch.t).float().view(-1, 1, 1, 1)
    return (batch.x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def _check_shared(model, data, draw, batch):
    b = draw.indices.shape[0]
    assert torch.equal(batch.t[:b], batch.t[b:])
    for name, tensor in batch.cond.tensors.items():
        assert torch.equal(tensor[:b], tensor[b:]), name
    x0 = model.encode(torch.cat([data.images[draw.indices], data.others[draw.indices]]).float() / 255)
    noise = _implied_noise(model, batch, x0)
    assert torch.allclose(noise[:b], noise[b:], atol=1e-3)
    assert torch.allclose(noise[:b], draw.noise, atol=1e-3)
    if model.prediction_type == "epsilon":
        assert torch.equal(batch.target[:b], batch.target[b:])  # the target is the shared noise


@pytest.mark.parametrize("which", ["eps_model_dir", "flow_model_dir"])
def test_pair_shares_noise_timestep_and_dropout(request, which, pairs):
    model = load_model(str(request.getfixturevalue(which)))
    data = training_data(pairs)
    cfg = config("unused", prompt_dropout=0.5)
    draw = draw_step(model, cfg, len(data), step=3, global_size=8)
    assert draw.drop.any() and not draw.drop.all()
    batch = pair_batch(model, data, draw)
    _check_shared(model, data, draw, batch)
    empty = model.encode_prompts([""]).tensors["input_ids"]
    dropped = torch.cat([draw.drop, draw.drop])
    assert (batch.cond.tensors["input_ids"][dropped] == empty).all()
    kept = torch.cat([~draw.drop, ~draw.drop])
    expected = model.encode_prompts([data.prompts[int(i)] for i in data.prompt_index[draw.indices]] * 2)
    assert torch.equal(batch.cond.tensors["input_ids"][kept], expected.tensors["input_ids"][kept])
    # the step's draw is a function of (seed, step) only
    again = draw_step(model, cfg, len(data), step=3, global_size=8)
    assert torch.equal(again.noise, draw.noise) and torch.equal(again.indices, draw.indices)


def test_training_loop_builds_shared_pairs(monkeypatch, tmp_path, eps_model_dir, pairs):
    seen = []

    def recording(model, data, draw):
        batch = pair_batch(model, data, draw)
        _check_shared(model, data, draw, batch)
        seen.append(draw.indices.clone())
        return batch

    monkeypatch.setattr(dpo_module, "pair_batch", recording)
    train_dpo(config(eps_model_dir, steps=2, prompt_dropout=0.3), pairs, tmp_path / "run")
    assert len(seen) == 2 and all(len(s) == 4 for s in seen)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_reference_fixed_and_parameters_change(tmp_path, eps_model_dir, pairs, lora_rank):
    base = load_model(str(eps_model_dir))
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn((4, *base.latent_shape), generator=g)
    t = torch.tensor([10.0, 200.0, 500.0, 900.0])
    cond = base.encode_prompts(pairs.prompts[:4])
    expected = base.predict(x, t, cond).detach()

    model = train_dpo(config(eps_model_dir, steps=3, lora_rank=lora_rank), pairs, tmp_path / "run")
    cond = Conditioning({k: v for k, v in cond.tensors.items()})
    # the reference is the base model (up to float summation order), the policy moved away from it
    assert torch.allclose(model.reference_predict(x, t, cond), expected, atol=1e-5)
    assert not torch.allclose(model.predict(x, t, cond).detach(), expected, atol=1e-3)
    trained = dict(model.unet.named_parameters())
    if lora_rank == 0:
        changed = [not torch.equal(before[k], p.detach()) for k, p in trained.items()]
        assert sum(changed) / len(changed) > 0.9  # embeddings of words never seen keep their values
    else:
        lora = {k: p for k, p in trained.items() if p.requires_grad}
        assert lora and all("lora" in k for k in lora)
        assert any(not torch.equal(p.detach(), torch.zeros_like(p)) for k, p in lora.items() if "lora_B" in k)
        saved = load_model(str(tmp_path / "run"))  # adapters merged into a plain model
        assert not torch.allclose(saved.predict(x, t, cond), expected, atol=1e-3)


def _lines(run):
    return [
        {k: v for k, v in r.items() if k != "seconds_per_step"} for r in read_metrics(run / "metrics.jsonl")
    ]


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_resume_matches_uninterrupted_run(tmp_path, eps_model_dir, pairs, method):
    cfg = config(eps_model_dir, method=method, steps=5, log_every=2, checkpoint_every=3, prompt_dropout=0.2)
    whole = train_dpo(cfg, pairs, tmp_path / "whole")
    train_dpo(cfg, pairs, tmp_path / "parts", stop_after=4)  # mid log window, after a checkpoint
    assert not (tmp_path / "parts" / "model").exists()
    resumed = train_dpo(cfg, pairs, tmp_path / "parts", resume=True)
    assert [r["step"] for r in _lines(tmp_path / "whole")] == [2, 4, 5]
    assert _lines(tmp_path / "whole") == _lines(tmp_path / "parts")
    for (name, a), b in zip(whole.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_model(str(tmp_path / "parts")).prediction_type == "epsilon"


def test_extend_continues_a_finished_run_as_the_longer_run_would(tmp_path, eps_model_dir, pairs):
    longer = train_dpo(config(eps_model_dir, steps=5, log_every=2), pairs, tmp_path / "whole")
    train_dpo(config(eps_model_dir, steps=4, log_every=2), pairs, tmp_path / "run")  # finished
    with pytest.raises(RunDirError, match=r"config\.steps.*--extend"):  # a plain resume refuses it
        train_dpo(config(eps_model_dir, steps=5, log_every=2), pairs, tmp_path / "run", resume=True)
    with pytest.raises(RunDirError, match=r"steps=3 ends before the latest checkpoint step-0000004"):
        train_dpo(config(eps_model_dir, steps=3, log_every=2), pairs, tmp_path / "run", extend=True)
    with pytest.raises(RunDirError, match=r"config\.beta"):  # only the length may change
        train_dpo(config(eps_model_dir, steps=5, beta=123.0), pairs, tmp_path / "run", extend=True)
    extended = train_dpo(config(eps_model_dir, steps=5, log_every=2), pairs, tmp_path / "run", extend=True)
    assert _lines(tmp_path / "whole") == _lines(tmp_path / "run")
    for (name, a), b in zip(longer.unet.state_dict().items(), extended.unet.state_dict().values()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["steps"] == 5
    assert (tmp_path / "run" / "model-step-0000004").is_dir()  # the 4-step model, kept
    shorter = load_model(str(tmp_path / "run" / "model-step-0000004")).unet.state_dict()
    assert any(not torch.equal(v, extended.unet.state_dict()[k]) for k, v in shorter.items())


def test_resume_refuses_other_config_and_fresh_run_refuses_used_folder(tmp_path, eps_model_dir, pairs):
    cfg = config(eps_model_dir, steps=4)
    train_dpo(cfg, pairs, tmp_path / "run", stop_after=2)
    with pytest.raises(RunDirError, match=r"config\.beta"):
        train_dpo(config(eps_model_dir, steps=4, beta=123.0), pairs, tmp_path / "run", resume=True)
    with pytest.raises(RunDirError, match=r"data\.fingerprint"):
        train_dpo(cfg, make_pairs(24, seed=5), tmp_path / "run", resume=True)
    with pytest.raises(RunDirError, match="already holds a run"):
        train_dpo(cfg, pairs, tmp_path / "run")
    with pytest.raises(RunDirError, match="holds no run"):
        train_dpo(cfg, pairs, tmp_path / "other", resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(monkeypatch, tmp_path, eps_model_dir, pairs):
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        out = diffusion_dpo_loss(*args)
        if calls["n"] >= 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(dpo_module, "diffusion_dpo_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step 3: the loss became NaN or inf") as err:
        train_dpo(config(eps_model_dir, steps=6, checkpoint_every=2), pairs, run)
    assert err.value.last_checkpoint == run / "checkpoints" / "step-0000002"
    assert "step-0000002" in str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert not (run / "model").exists()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_flow_model_trains_with_velocity_targets(tmp_path, flow_model_dir, pairs):
    model = train_dpo(config(flow_model_dir, steps=2, flow_timesteps="uniform"), pairs, tmp_path / "run")
    assert model.prediction_type == "flow"
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["resolved"]["beta"] == dpo_module.DEFAULT_BETA[("dpo", "flow")]
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    assert load_model(str(tmp_path / "run")).prediction_type == "flow"


def test_ties_left_out_and_tie_only_or_empty_data_is_an_error(tmp_path, eps_model_dir):
    data = training_data(make_pairs(10, ties=4))
    assert len(data) == 6 and data.ties_dropped == 4
    with pytest.raises(PreferenceDataError, match="only ties"):
        training_data(make_pairs(3, ties=3))
    with pytest.raises(PreferenceDataError, match="empty"):
        training_data(make_pairs(3).select([]))
    with pytest.raises(PreferenceDataError, match="only ties"):
        train_dpo(config(eps_model_dir), make_pairs(3, ties=3), tmp_path / "run")


def test_winner_is_the_preferred_image():
    pairs = make_pairs(4)
    data = training_data(pairs)
    assert torch.equal(data.images[0], pairs.images_a[0]) and torch.equal(data.others[0], pairs.images_b[0])
    assert torch.equal(data.images[1], pairs.images_b[1]) and torch.equal(data.others[1], pairs.images_a[1])
    kto = training_data(pairs, "kto")
    assert len(kto) == 8 and kto.liked.tolist() == [True] * 4 + [False] * 4


def test_image_size_must_match_the_model(tmp_path, eps_model_dir):
    from diffalign.prefs.pairs import PreferencePairs

    big = PreferencePairs(
        ["a circle"],
        torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
        torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
        torch.tensor([1.0]),
    )
    with pytest.raises(PreferenceDataError, match="size=16"):
        train_dpo(config(eps_model_dir), big, tmp_path / "run")


def test_config_file_and_overrides_map_onto_the_dataclass(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("beta: 1500\nruntime:\n  seed: 3\n  device: cpu\nlora_rank: 4\n")
    cfg = load_config(DPOConfig, path, ["lr=2e-5", "runtime.gradient_accumulation_steps=2", "method=kto"])
    assert cfg.beta == 1500.0 and cfg.lr == 2e-5 and cfg.lora_rank == 4 and cfg.method == "kto"
    assert (
        cfg.runtime.seed == 3 and cfg.runtime.device == "cpu" and cfg.runtime.gradient_accumulation_steps == 2
    )
    with pytest.raises(ConfigError, match="betta"):
        load_config(DPOConfig, None, ["betta=1"])
    with pytest.raises(ConfigError, match=r"runtime\.seed"):
        load_config(DPOConfig, None, ["runtime.seed=abc"])
    with pytest.raises(ConfigError, match="method"):
        load_config(DPOConfig, None, ["method=ipo"])
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(DPOConfig, None, ["runtime.mixed_precision=fp8"])


@pytest.mark.parametrize("which", ["eps_model_dir", "flow_model_dir"])
def test_timestep_range_maps_draws_into_the_range(request, which, pairs):
    model = load_model(str(request.getfixturevalue(which)))
    data = training_data(pairs)
    full = draw_step(model, config("unused"), len(data), step=1, global_size=256)
    low = draw_step(model, config("unused", timestep_range=(0.0, 0.3)), len(data), step=1, global_size=256)
    assert torch.equal(full.noise, low.noise) and torch.equal(full.indices, low.indices)
    if model.prediction_type == "flow":
        assert torch.allclose(low.t, 0.3 * full.t)
    else:
        assert torch.equal(low.t, (0.3 * full.t).floor())
        assert low.t.max() < 300 and low.t.min() >= 0
    high = draw_step(model, config("unused", timestep_range=(0.7, 1.0)), len(data), step=1, global_size=256)
    assert high.t.min() >= (0.7 if model.prediction_type == "flow" else 700)
    with pytest.raises(ValueError, match="timestep_range"):
        config("unused", timestep_range=(0.5, 0.5))


def test_sft_weight_adds_the_winners_term(eps_model_dir, pairs):
    model = load_model(str(eps_model_dir))
    model.freeze_reference()
    with torch.no_grad():  # a policy that differs from the reference, so err != ref
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    data = training_data(pairs)
    draw = draw_step(model, config("unused"), len(data), step=0, global_size=6)
    batch = pair_batch(model, data, draw)
    plain, _ = dpo_module.dpo_micro_loss(model, model.unet, batch, beta=300.0)
    with_sft, metrics = dpo_module.dpo_micro_loss(model, model.unet, batch, beta=300.0, sft_weight=0.5)
    err, ref = dpo_module._errors(model, model.unet, batch)
    expected = plain + 0.5 * 0.5 * 300.0 * (err[:6] - ref[:6]).mean()
    assert torch.allclose(with_sft, expected, atol=1e-6)
    assert float(metrics[0]) == pytest.approx(float(with_sft.detach()))
    with pytest.raises(ValueError, match="sft_weight"):
        config("unused", sft_weight=-1.0)


@pytest.mark.parametrize("which", ["eps_model_dir", "flow_model_dir"])
def test_mirror_relations_flips_winner_and_loser_alike_and_exchanges_the_words(request, which):
    model = load_model(str(request.getfixturevalue(which)))
    prompts = ["a circle left of a square", "a square above a triangle"] * 4
    pairs = make_pairs(8)
    pairs = type(pairs)(prompts, pairs.images_a, pairs.images_b, pairs.prob_a)
    data = training_data(pairs)
    plain = draw_step(model, config("unused"), len(data), step=2, global_size=8)
    draw = draw_step(model, config("unused", mirror_relations=True), len(data), step=2, global_size=8)
    assert plain.flips is None
    # the mirrors are drawn after everything else: the rest of the step's draw is unchanged
    assert torch.equal(draw.noise, plain.noise) and torch.equal(draw.t, plain.t)
    assert draw.flips.shape == (8, 2) and draw.flips.any() and not draw.flips.all()
    batch = pair_batch(model, data, draw)
    # the batch is the plain batch of the mirrored images under the mirrored prompts
    idx = draw.indices
    winners, losers = data.images[idx].clone(), data.others[idx].clone()
    expected_prompts = []
    for row, (horizontal, vertical) in enumerate(draw.flips.tolist()):
        prompt = data.prompts[int(data.prompt_index[idx[row]])]
        for flip, dim, words in ((horizontal, -1, ("left", "right")), (vertical, -2, ("above", "below"))):
            if flip:
                winners[row], losers[row] = winners[row].flip(dim), losers[row].flip(dim)
                prompt = prompt.replace(words[0], "@").replace(words[1], words[0]).replace("@", words[1])
        expected_prompts.append(prompt)
    x0 = model.encode(torch.cat([winners, losers]).float() / 255)
    expected = dpo_module.denoising_batch(
        model,
        x0,
        torch.cat([draw.noise, draw.noise]),
        torch.cat([draw.t, draw.t]),
        model.encode_prompts(expected_prompts * 2),
    )
    assert torch.allclose(batch.x_t, expected.x_t, atol=1e-6)
    assert torch.equal(batch.cond.tensors["input_ids"], expected.cond.tensors["input_ids"])
    assert not torch.allclose(batch.x_t, pair_batch(model, data, plain).x_t)


def test_soft_labels_keep_ties_at_one_half_and_smoothing_softens_every_label():
    pairs = make_pairs(10, ties=4)
    hard = training_data(pairs)
    assert hard.labels is None and len(hard) == 6 and hard.ties_dropped == 4 and hard.ties_kept == 0
    soft = training_data(pairs, soft_labels=True)
    assert len(soft) == 10 and soft.ties_dropped == 0 and soft.ties_kept == 4
    assert soft.labels.tolist() == [1.0] * 6 + [0.5] * 4
    assert torch.equal(soft.images[9], pairs.images_a[9]) and torch.equal(soft.others[9], pairs.images_b[9])
    assert torch.equal(soft.images[1], pairs.images_b[1])  # B won pair 1: still the winner first
    smooth = training_data(pairs, soft_labels=True, label_smoothing=0.1)
    assert smooth.labels.tolist() == pytest.approx([0.9] * 6 + [0.5] * 4)
    hard_smooth = training_data(pairs, label_smoothing=0.1)
    assert len(hard_smooth) == 6 and hard_smooth.labels.tolist() == pytest.approx([0.9] * 6)
    # the labels are part of the data a resumed run must match; the paper's data keeps its fingerprint
    assert len({hard.fingerprint, soft.fingerprint, smooth.fingerprint, hard_smooth.fingerprint}) == 4
    assert training_data(make_pairs(10, ties=4)).fingerprint == hard.fingerprint
    with pytest.raises(PreferenceDataError, match="only ties"):  # ties alone teach nothing
        training_data(make_pairs(3, ties=3), soft_labels=True)


def test_fractional_labels_keep_their_share_with_soft_labels():
    from diffalign.prefs.pairs import PreferencePairs

    base = make_pairs(3)
    pairs = PreferencePairs(base.prompts, base.images_a, base.images_b, torch.tensor([0.7, 0.2, 0.5]))
    soft = training_data(pairs, soft_labels=True)
    assert soft.labels.tolist() == pytest.approx([0.7, 0.8, 0.5])
    assert torch.equal(soft.images[0], pairs.images_a[0]) and torch.equal(soft.images[1], pairs.images_b[1])
    hard = training_data(pairs)  # the paper's: the favoured image wins outright, the tie is left out
    assert len(hard) == 2 and hard.labels is None and torch.equal(hard.images[1], pairs.images_b[1])


def test_soft_label_options_are_dpo_only_and_checked():
    with pytest.raises(ValueError, match="label_smoothing"):
        config("unused", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        config("unused", label_smoothing=-0.1)
    with pytest.raises(ValueError, match="no pair label"):
        config("unused", method="kto", soft_labels=True)
    with pytest.raises(ValueError, match="no pair label"):
        config("unused", method="kto", label_smoothing=0.1)


def test_soft_label_micro_batch_metrics_and_sft_skip_the_ties(eps_model_dir):
    model = load_model(str(eps_model_dir))
    model.freeze_reference()
    with torch.no_grad():  # a policy that differs from the reference, so err != ref
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    data = training_data(make_pairs(8, ties=3), soft_labels=True)
    draw = draw_step(model, config("unused"), len(data), step=0, global_size=8)
    batch = pair_batch(model, data, draw)
    labels = data.labels[draw.indices]
    assert (labels == 0.5).any() and (labels == 1.0).any()
    loss, metrics = dpo_module.dpo_micro_loss(model, model.unet, batch, 300.0, 0.5, labels)
    err, ref = dpo_module._errors(model, model.unet, batch)
    out = diffusion_dpo_loss(err[:8], err[8:], ref[:8], ref[8:], 300.0, labels)
    decisive = (labels != 0.5).float()
    expected = out.loss + 0.5 * 0.5 * 300.0 * ((err[:8] - ref[:8]) * decisive).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    line = dict(zip(dpo_module.SOFT_DPO_METRICS, metrics.tolist()))
    dpo_module.finish_soft_metrics(line)
    assert line["decisive_share"] == pytest.approx(float(decisive.mean()))
    assert line["implicit_acc"] == pytest.approx(float(out.implicit_acc))
    assert line["reward_margin"] == pytest.approx(float(out.reward_margin.detach()), rel=1e-5)
    ties = labels == 0.5
    assert line["tie_abs_margin"] == pytest.approx(float(out.inside[ties].detach().abs().mean()), rel=1e-5)


def test_soft_label_run_trains_on_ties_logs_per_decisive_pair_and_resumes(tmp_path, eps_model_dir):
    pairs = make_pairs(24, ties=8)
    cfg = config(
        eps_model_dir, steps=5, log_every=2, checkpoint_every=3, soft_labels=True, label_smoothing=0.05
    )
    whole = train_dpo(cfg, pairs, tmp_path / "whole")
    record = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert record["data"]["ties_kept"] == 8 and record["data"]["examples"] == 24
    lines = _lines(tmp_path / "whole")
    assert all(0 < r["decisive_share"] < 1 and r["tie_abs_margin"] >= 0 for r in lines)
    assert all(0 <= r["implicit_acc"] <= 1 for r in lines)
    train_dpo(cfg, pairs, tmp_path / "parts", stop_after=4)
    resumed = train_dpo(cfg, pairs, tmp_path / "parts", resume=True)
    assert _lines(tmp_path / "whole") == _lines(tmp_path / "parts")
    for (name, a), b in zip(whole.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b), name
    # the same data and seed without the ties trains other weights
    plain = train_dpo(config(eps_model_dir, steps=5, log_every=2), pairs, tmp_path / "plain")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(whole.unet.state_dict().values(), plain.unet.state_dict().values())
    )


def _ratings(n: int = 12, seed: int = 0):
    from diffalign.prefs.ratings import ImageRatings

    pairs = make_pairs(n // 2, seed=seed)
    ratings = ImageRatings.from_pairs(pairs)
    # unpaired: not every liked image has a disliked one of its prompt (the last two are dropped)
    keep = list(range(n - 2))
    return ImageRatings(
        [ratings.prompts[i] for i in keep],
        ratings.images[keep],
        ratings.liked[keep],
        [f"ratings.jsonl line {i + 1}" for i in keep],
    )


def test_kto_trains_on_unpaired_ratings_and_resumes(tmp_path, eps_model_dir):
    ratings = _ratings()
    cfg = config(eps_model_dir, method="kto", steps=5, log_every=2, checkpoint_every=3)
    whole = train_dpo(cfg, ratings, tmp_path / "whole", data_spec={"ratings": "r.jsonl"})
    record = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert record["data"]["ratings"] == "r.jsonl" and record["data"]["examples"] == 10
    assert (record["data"]["liked"], record["data"]["disliked"]) == (6, 4)
    base = load_model(str(eps_model_dir))
    assert any(
        not torch.equal(a, b)
        for a, b in zip(whole.unet.state_dict().values(), base.unet.state_dict().values())
    )
    train_dpo(cfg, ratings, tmp_path / "parts", stop_after=4)
    resumed = train_dpo(cfg, ratings, tmp_path / "parts", resume=True)
    assert _lines(tmp_path / "whole") == _lines(tmp_path / "parts")
    for (name, a), b in zip(whole.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(RunDirError, match=r"data\.fingerprint"):  # other ratings
        train_dpo(cfg, _ratings(seed=3), tmp_path / "parts", resume=True, data_spec={"ratings": "r.jsonl"})


def test_ratings_refused_by_dpo_and_an_unreadable_prompt_named_by_line(tmp_path, eps_model_dir):
    from diffalign.prefs.ratings import ImageRatings

    ratings = _ratings()
    with pytest.raises(PreferenceDataError, match="compare no two images"):
        train_dpo(config(eps_model_dir), ratings, tmp_path / "dpo")
    odd = ImageRatings(
        ["a red circle", "a photo of a cat"],
        ratings.images[:2],
        ratings.liked[:2],
        ["r.jsonl line 1", "r.jsonl line 2"],
    )
    with pytest.raises(PreferenceDataError, match=r"r\.jsonl line 2 \(1 example with this prompt\)"):
        train_dpo(config(eps_model_dir, method="kto"), odd, tmp_path / "kto")
    assert not (tmp_path / "kto" / "checkpoints").exists()
