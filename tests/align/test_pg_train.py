"""Policy-gradient training end to end on tiny models: the first-step ratio is 1 (and its check fires),
parameters change, the reward rises, resume reproduces, NaN stops with the last good checkpoint."""

import json

import pytest
import torch

import diffalign.align.pg_rollout as rollout_module
import diffalign.align.policy_gradient as pg_module
from diffalign.align.guard import NonFiniteError
from diffalign.align.policy_gradient import RatioCheckError, train_pg
from diffalign.align.run_dir import RunDirError
from diffalign.align.tracking import read_metrics
from diffalign.models.registry import load_model
from tests.align.pg_helpers import NaNAfter, Redness, pg_config, trainable

TIMINGS = ("sample_seconds", "seconds_per_epoch")


def _untimed(lines):
    return [{k: v for k, v in line.items() if k not in TIMINGS} for line in lines]


@pytest.mark.parametrize(
    ("which", "method", "extra"),
    [
        ("eps_model_dir", "ddpo", {}),
        ("eps_model_dir", "dpok", {"guidance_scale": 2.0}),
        ("flow_model_dir", "grpo", {"timestep_fraction": 0.5, "train_batch_size": 4}),
    ],
)
def test_first_step_ratio_is_one_and_parameters_change(request, tmp_path, which, method, extra):
    model_dir = request.getfixturevalue(which)
    base = trainable(load_model(str(model_dir)))
    cfg = pg_config(model_dir, method=method, epochs=2, **extra)
    model = train_pg(cfg, tmp_path / "run", reward=Redness())
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert line["first_step_log_ratio"] < 1e-5  # on-policy: recomputed == recorded log-probs
        assert line["grad_norm"] > 0 and line["reward_queries"] == line["step"] * 8
        assert line["kl_to_base"] >= 0 and 0 <= line["clip_fraction"] <= 1
    if method == "ddpo":  # without a KL term, it is measured on each epoch's first micro-batch
        assert lines[0]["kl_to_base"] == pytest.approx(0.0, abs=1e-12)  # epoch 1 starts at the base
    assert lines[1]["kl_to_base"] > lines[0]["kl_to_base"]
    after = trainable(model)
    assert all(not torch.equal(base[k], after[k]) for k in base), "every trainable tensor should move"
    assert load_model(str(tmp_path / "run")).prediction_type == model.prediction_type
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["resolved"]["kl_beta"] == {"ddpo": 0.0, "dpok": 0.01, "grpo": 0.04}[method]


def test_ratio_check_fires_when_sampling_and_training_disagree(tmp_path, eps_model_dir, monkeypatch):
    original = rollout_module.sample_local

    def shifted(*args, **kwargs):
        latents, log_probs, images, timesteps, stochastic = original(*args, **kwargs)
        return latents, log_probs + 1e-2 * stochastic.float(), images, timesteps, stochastic

    monkeypatch.setattr(pg_module, "sample_local", shifted)
    with pytest.raises(RatioCheckError, match=r"epoch 1: .*importance ratio must be 1"):
        train_pg(pg_config(eps_model_dir), tmp_path / "run", reward=Redness())


@pytest.mark.slow
def test_reward_rises(tmp_path, eps_model_dir):
    cfg = pg_config(
        eps_model_dir,
        method="grpo",
        epochs=8,
        prompts_per_epoch=4,
        samples_per_prompt=4,
        sample_batch_size=16,
        train_batch_size=16,
        lr=3e-3,
        checkpoint_every=0,
    )
    train_pg(cfg, tmp_path / "run", reward=Redness())
    rewards = [line["reward_mean"] for line in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.01, rewards


def test_resume_reproduces_the_uninterrupted_run(tmp_path, eps_model_dir):
    cfg = pg_config(eps_model_dir, epochs=3, checkpoint_every=0)
    full = train_pg(cfg, tmp_path / "full", reward=Redness())
    train_pg(cfg, tmp_path / "split", stop_after=1, reward=Redness())
    assert not (tmp_path / "split" / "model").exists()
    resumed = train_pg(cfg, tmp_path / "split", resume=True, reward=Redness())
    a = _untimed(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    b = _untimed(read_metrics(tmp_path / "split" / "metrics.jsonl"))
    assert a == b
    for name, value in trainable(full).items():
        assert torch.equal(value, trainable(resumed)[name]), name
    with pytest.raises(RunDirError, match="differs"):
        train_pg(
            pg_config(eps_model_dir, epochs=3, lr=5e-4, checkpoint_every=0),
            tmp_path / "split",
            resume=True,
            reward=Redness(),
        )


def test_extend_lengthens_a_finished_run_exactly(tmp_path, eps_model_dir):
    cfg = pg_config(eps_model_dir, epochs=3, checkpoint_every=0)
    longer = train_pg(cfg, tmp_path / "full", reward=Redness())
    train_pg(pg_config(eps_model_dir, epochs=2, checkpoint_every=0), tmp_path / "run", reward=Redness())
    extended = train_pg(cfg, tmp_path / "run", extend=True, reward=Redness())
    assert _untimed(read_metrics(tmp_path / "full" / "metrics.jsonl")) == _untimed(
        read_metrics(tmp_path / "run" / "metrics.jsonl")
    )
    for name, value in trainable(longer).items():
        assert torch.equal(value, trainable(extended)[name]), name
    assert (tmp_path / "run" / "model-step-0000002").is_dir() and (tmp_path / "run" / "model").is_dir()


def test_nan_reward_stops_with_the_last_good_checkpoint(tmp_path, eps_model_dir):
    cfg = pg_config(eps_model_dir, epochs=5, checkpoint_every=2)
    with pytest.raises(NonFiniteError, match="reward") as err:
        train_pg(cfg, tmp_path / "run", reward=NaNAfter(calls=3))
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-0000002"]
    assert "step-0000002" in str(err.value)
    assert not (tmp_path / "run" / "model").exists()


def test_lora_trains_only_adapters_and_logs_gold_and_grids(tmp_path, eps_model_dir):
    cfg = pg_config(eps_model_dir, epochs=1, lora_rank=4, gold="gold-faithfulness", grid_every=1)
    model = train_pg(cfg, tmp_path / "run", reward=Redness())
    names = list(trainable(model))
    assert names and all("lora" in n for n in names)
    line = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert 0.0 <= line["gold_mean"] <= 1.0 and line["diversity"] > 0
    assert (tmp_path / "run" / "grids" / "epoch-00001.png").is_file()


@pytest.mark.parametrize("which", ["eps_model_dir", "flow_model_dir"])
def test_sde_window_trains_only_the_windows_steps_and_shared_noise_starts_groups_together(
    request, tmp_path, which, monkeypatch
):
    model_dir = request.getfixturevalue(which)
    seen = []
    original_pairs, original_sample = rollout_module.training_pairs, rollout_module.sample_local

    def recording_pairs(rollout, *args, **kwargs):
        rows, cols = original_pairs(rollout, *args, **kwargs)
        seen.append((rollout.stochastic.clone(), rollout.latents[:, 0].clone(), cols.clone()))
        return rows, cols

    samplers = []

    def recording_sample(model, prompts, seeds, config, batch_size, initial_noise=None):
        samplers.append(config)
        return original_sample(model, prompts, seeds, config, batch_size, initial_noise)

    monkeypatch.setattr(pg_module, "training_pairs", recording_pairs)
    monkeypatch.setattr(pg_module, "sample_local", recording_sample)
    cfg = pg_config(
        model_dir, method="grpo", epochs=3, sde_window_size=2, group_shared_noise=True, checkpoint_every=0
    )
    train_pg(cfg, tmp_path / "run", reward=Redness())
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for (stochastic, x_T, cols), config, line in zip(seen, samplers, lines):
        start, end = config.sde_window
        assert end - start == 2 and line["sde_window_start"] == start
        assert 0 <= line["flat_groups"] <= 1 and line["flat_groups"] * 4 == round(line["flat_groups"] * 4)
        assert stochastic.tolist() == [start <= i < end for i in range(4)]
        assert ((cols >= start) & (cols < end)).all()  # only the window's steps are trained on
        assert line["first_step_log_ratio"] < 1e-5
        for group in range(4):  # 4 prompts x 2 samples: each group starts from one noise
            assert torch.equal(x_T[2 * group], x_T[2 * group + 1])
        assert not torch.equal(x_T[0], x_T[2])
    # a resumed windowed run draws the same windows
    train_pg(cfg, tmp_path / "split", stop_after=1, reward=Redness())
    train_pg(cfg, tmp_path / "split", resume=True, reward=Redness())
    assert _untimed(read_metrics(tmp_path / "split" / "metrics.jsonl")) == _untimed(lines)


def test_progressive_sde_window_moves_one_step_per_epoch(tmp_path, eps_model_dir):
    cfg = pg_config(
        eps_model_dir,
        method="grpo",
        epochs=3,
        sde_window_size=1,
        sde_window_schedule="progressive",
        sde_window_shift_every=1,
        checkpoint_every=0,
    )
    train_pg(cfg, tmp_path / "run", reward=Redness())
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [line["sde_window_start"] for line in lines] == [0, 1, 2]
    assert all(line["first_step_log_ratio"] < 1e-5 for line in lines)


@pytest.mark.parametrize(
    "which, sampler",
    [
        ("eps_model_dir", dict(sampler="ddim", eta=1.0)),
        ("eps_model_dir", dict(sampler="ddpm")),
        ("flow_model_dir", dict(sampler="flow_sde", noise_level=0.7)),
    ],
)
def test_the_steps_trained_per_sample_are_known_before_sampling(request, which, sampler):
    """The trainer refuses an indivisible batch before sampling from `trained_steps_per_sample`; it must
    count what `training_pairs` then takes from the sampled trajectories' stochastic steps."""
    from diffalign.diffusion.sampling import SamplerConfig, sample

    model = load_model(str(request.getfixturevalue(which)))
    base = SamplerConfig(num_steps=5, guidance_scale=1.0, **sampler)
    for window in (0, 2):
        epoch = rollout_module.epoch_sampler(base, window, None, seed=0, epoch=3)
        stochastic = int(sample(model, ["a circle"], config=epoch, seeds=[0]).stochastic.sum())
        for fraction in (0.2, 0.5, 1.0):
            expected = max(1, round(fraction * stochastic))
            assert rollout_module.trained_steps_per_sample(base, window, fraction) == expected


def test_an_indivisible_batch_is_refused_before_the_run_begins(tmp_path, eps_model_dir, monkeypatch):
    sampled = []
    monkeypatch.setattr(pg_module, "sample_local", lambda *a, **k: sampled.append(1))
    # 4 prompts x 2 samples x round(0.5 * 3) = 16 (sample, step) pairs; batches of 6 do not divide them
    cfg = pg_config(eps_model_dir, num_steps=4, timestep_fraction=0.5, train_batch_size=6)
    with pytest.raises(ValueError, match=r"trains 16 \(sample, step\) pairs.*6 pairs"):
        train_pg(cfg, tmp_path / "run", reward=Redness())
    assert not sampled and not (tmp_path / "run" / "config.json").exists()
