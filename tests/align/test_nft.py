"""DiffusionNFT: the loss against a hand computation and its gradient at the old policy, the seeded
training points, the old policy's swap, and the trainer end to end on tiny models (parameters change,
the reward rises, resume reproduces, NaN stops with the last good checkpoint, the CLI, two processes)."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

import diffalign.cli.align_pg  # noqa: F401  (registers the commands on the align app)
from diffalign.align.guard import NonFiniteError
from diffalign.align.nft import OldPolicy, train_nft, training_points
from diffalign.align.nft_config import NFTConfig
from diffalign.align.nft_loss import nft_loss, optimality_probability
from diffalign.align.run_dir import RunDirError
from diffalign.align.tracking import read_metrics
from diffalign.cli.align import app
from diffalign.diffusion.schedules import DDPMSchedule, FlowSchedule
from diffalign.models.registry import load_model
from tests.align.pg_helpers import NaNAfter, Redness, nft_config, trainable
from tests.align.test_distributed import _free_port, join_as_process

TIMINGS = ("sample_seconds", "seconds_per_epoch")


# --- the loss ------------------------------------------------------------------------------------


def _hand_loss(new, old, x_t, t, x0, r, beta, adv_clip, to_x0):
    """The paper's loss written out per sample with plain loops."""
    losses = []
    for i in range(len(new)):
        pos = beta * new[i] + (1 - beta) * old[i]
        neg = (1 + beta) * old[i] - beta * new[i]
        terms = []
        for out in (pos, neg):
            err = to_x0(out, x_t[i], t[i]) - x0[i]
            weight = max(float(err.abs().mean()), 1e-5)
            terms.append(float((err**2).mean()) / weight)
        losses.append((float(r[i]) * terms[0] + (1 - float(r[i])) * terms[1]) * adv_clip / beta)
    return torch.tensor(losses)


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_loss_equals_a_hand_computation_for_a_flow_model(beta):
    gen = torch.Generator().manual_seed(0)
    new, old, x_t, x0 = (torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    r = torch.tensor([1.0, 0.25, 0.5], dtype=torch.float64)
    out = nft_loss(
        new, old, x_t, t, x0, r, beta=beta, adv_clip=5.0, prediction_type="flow", schedule=FlowSchedule()
    )
    expected = _hand_loss(new, old, x_t, t, x0, r, beta, 5.0, lambda v, x, tt: x - tt * v)
    torch.testing.assert_close(out.per_sample, expected.double())
    assert float(out.loss) == pytest.approx(float(expected.mean()))
    assert float(out.old_deviation) == pytest.approx(float(((new - old) ** 2).mean()))


def test_loss_maps_epsilon_outputs_through_x0():
    schedule = DDPMSchedule()
    gen = torch.Generator().manual_seed(1)
    new, old, x_t, x0 = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([700.0, 50.0], dtype=torch.float64)
    r = torch.tensor([0.8, 0.1], dtype=torch.float64)
    betas = torch.linspace(
        schedule.beta_start, schedule.beta_end, schedule.num_train_timesteps, dtype=torch.float64
    )
    abar = torch.cumprod(1 - betas, 0)

    def to_x0(eps, x, tt):
        a = abar[int(tt)]
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    out = nft_loss(
        new, old, x_t, t, x0, r, beta=1.0, adv_clip=5.0, prediction_type="epsilon", schedule=schedule
    )
    torch.testing.assert_close(out.per_sample, _hand_loss(new, old, x_t, t, x0, r, 1.0, 5.0, to_x0).double())


def test_gradient_at_the_old_policy_is_an_advantage_weighted_denoising_step():
    """At v_theta = v_old the gradient is (2r - 1) adv_clip times the adaptive denoising loss's, whatever
    beta: r = 1 lowers the error, r = 0 raises it, r = 1/2 leaves the policy where it is."""
    gen = torch.Generator().manual_seed(2)
    old, x_t, x0 = (torch.randn(1, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.6], dtype=torch.float64)

    def grad(r: float, beta: float = 0.5) -> torch.Tensor:
        new = old.clone().requires_grad_(True)
        out = nft_loss(
            new,
            old,
            x_t,
            t,
            x0,
            torch.tensor([r]),
            beta=beta,
            adv_clip=2.0,
            prediction_type="flow",
            schedule=FlowSchedule(),
        )
        out.loss.backward()
        return new.grad

    plain = old.clone().requires_grad_(True)
    err = x_t - t * plain - x0
    ((err**2).mean() / err.detach().abs().mean()).backward()
    torch.testing.assert_close(grad(1.0), plain.grad * 2.0)
    torch.testing.assert_close(grad(0.0), -plain.grad * 2.0)
    torch.testing.assert_close(grad(0.0, beta=1.0), -plain.grad * 2.0)
    torch.testing.assert_close(grad(0.75), plain.grad * 0.5 * 2.0)
    assert torch.allclose(grad(0.5), torch.zeros_like(old))


def test_optimality_probability_maps_clipped_advantages_to_the_unit_interval():
    r = optimality_probability(torch.tensor([-9.0, -5.0, -1.0, 0.0, 2.5, 7.0]), adv_clip=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.4, 0.5, 0.75, 1.0]))


# --- training points and the old policy ------------------------------------------------------------


def test_training_points_are_seeded_and_cover_every_sample():
    levels = [999.0, 666.0, 333.0]
    rows, t, noise = training_points(6, levels, 3, (1, 2, 2), seed=4, epoch=2)
    again = training_points(6, levels, 3, (1, 2, 2), seed=4, epoch=2)
    assert all(torch.equal(a, b) for a, b in zip((rows, t, noise), again))
    assert sorted(rows.tolist()) == sorted(list(range(6)) * 3)
    assert set(t.tolist()) <= set(levels) and noise.shape == (18, 1, 2, 2)
    other = training_points(6, levels, 3, (1, 2, 2), seed=4, epoch=3)
    assert not torch.equal(noise, other[2])


def test_old_policy_swaps_its_weights_in_and_back_and_follows_the_trained_ones():
    layer = torch.nn.Linear(2, 2)
    params = list(layer.parameters())
    old = OldPolicy(params)
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    trained = [p.detach().clone() for p in params]
    with old.active():
        assert all(torch.equal(p, s) for p, s in zip(params, start))
    assert all(torch.equal(p, s) for p, s in zip(params, trained))
    old.update(decay=0.25)
    assert all(torch.allclose(w, s + 0.75) for w, s in zip(old.weights, start))
    old.update(decay=0.0)
    assert all(torch.equal(w, p) for w, p in zip(old.weights, trained))


def test_config_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        NFTConfig(samples_per_prompt=1)
    with pytest.raises(ValueError, match="old_decay"):
        NFTConfig(old_decay=1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        NFTConfig(beta=0.0)
    with pytest.raises(ValueError, match=r"sampler: .*flow models"):
        NFTConfig(sampler="flow_euler").sampler_config("epsilon")
    levels = NFTConfig(num_steps=4, time_fraction=0.5).training_levels(
        NFTConfig(num_steps=4).sampler_config("flow"), FlowSchedule()
    )
    assert levels == [1.0, 0.75]


# --- the trainer -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "extra"), [("eps_model_dir", {}), ("flow_model_dir", {"guidance_scale": 2.0})]
)
def test_parameters_change_and_metrics_are_logged(request, tmp_path, which, extra):
    model_dir = request.getfixturevalue(which)
    base = trainable(load_model(str(model_dir)))
    model = train_nft(nft_config(model_dir, epochs=2, **extra), tmp_path / "run", reward=Redness())
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert line["reward_queries"] == line["step"] * 8 and line["grad_norm"] > 0
        assert line["old_deviation"] >= 0 and 0 <= line["flat_groups"] <= 1
    assert lines[0]["kl_to_base"] == pytest.approx(0.0, abs=1e-12)  # epoch 1 starts at the base
    assert lines[1]["kl_to_base"] > 0
    after = trainable(model)
    assert all(not torch.equal(base[k], after[k]) for k in base), "every trainable tensor should move"
    assert load_model(str(tmp_path / "run")).prediction_type == model.prediction_type


@pytest.mark.slow
def test_reward_rises(tmp_path, eps_model_dir):
    cfg = nft_config(
        eps_model_dir,
        epochs=8,
        prompts_per_epoch=4,
        samples_per_prompt=4,
        sample_batch_size=16,
        train_batch_size=16,
        lr=1e-3,
        checkpoint_every=0,
    )
    train_nft(cfg, tmp_path / "run", reward=Redness())
    rewards = [line["reward_mean"] for line in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.01, rewards


def test_resume_reproduces_the_uninterrupted_run(tmp_path, eps_model_dir):
    cfg = nft_config(eps_model_dir, epochs=3, checkpoint_every=0, old_decay=0.5, kl_beta=0.1)
    full = train_nft(cfg, tmp_path / "full", reward=Redness())
    train_nft(cfg, tmp_path / "split", stop_after=1, reward=Redness())
    assert not (tmp_path / "split" / "model").exists()
    resumed = train_nft(cfg, tmp_path / "split", resume=True, reward=Redness())

    def untimed(path):
        return [{k: v for k, v in line.items() if k not in TIMINGS} for line in read_metrics(path)]

    assert untimed(tmp_path / "full" / "metrics.jsonl") == untimed(tmp_path / "split" / "metrics.jsonl")
    for name, value in trainable(full).items():
        assert torch.equal(value, trainable(resumed)[name]), name
    short = nft_config(eps_model_dir, epochs=2, checkpoint_every=0, old_decay=0.5, kl_beta=0.1)
    train_nft(short, tmp_path / "short", reward=Redness())
    extended = train_nft(cfg, tmp_path / "short", extend=True, reward=Redness())  # finished, then 3 epochs
    assert untimed(tmp_path / "full" / "metrics.jsonl") == untimed(tmp_path / "short" / "metrics.jsonl")
    for name, value in trainable(full).items():
        assert torch.equal(value, trainable(extended)[name]), name
    with pytest.raises(RunDirError, match="differs"):
        train_nft(
            nft_config(eps_model_dir, epochs=3, lr=5e-4), tmp_path / "split", resume=True, reward=Redness()
        )


def test_nan_reward_stops_with_the_last_good_checkpoint(tmp_path, eps_model_dir):
    with pytest.raises(NonFiniteError, match="reward") as err:
        train_nft(nft_config(eps_model_dir, epochs=5), tmp_path / "run", reward=NaNAfter(calls=3))
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-0000002"] and "step-0000002" in str(err.value)


def test_batch_sizes_that_do_not_divide_the_epoch_are_refused(tmp_path, eps_model_dir):
    with pytest.raises(ValueError, match="does not divide"):
        train_nft(nft_config(eps_model_dir, train_batch_size=5), tmp_path / "run", reward=Redness())


def test_cli_writes_a_run_whose_model_loads(tmp_path, eps_model_dir):
    (tmp_path / "reward.py").write_text(
        "def redness(images, prompts):\n"
        "    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))\n"
    )
    out = tmp_path / "run"
    args = ["nft", "--model", str(eps_model_dir), "--reward", f"{tmp_path / 'reward.py'}:redness"]
    fast = ["epochs=1", "num_steps=4", "guidance_scale=1", "prompts_per_epoch=2", "samples_per_prompt=2"]
    fast += ["train_batch_size=4", "gold=none", "grid_every=0", "log_with=none"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu", *fast])
    assert result.exit_code == 0, result.output
    assert load_model(str(out)).prediction_type == "epsilon"
    assert read_metrics(out / "metrics.jsonl")[0]["reward_queries"] == 4
    bad = CliRunner().invoke(app, ["nft", "--out", str(tmp_path / "b"), "samples_per_prompt=1"])
    assert bad.exit_code != 0 and "samples_per_prompt" in bad.output


def _worker(rank: int, world: int, port: int, model_dir: str, run_dir: str) -> None:
    join_as_process(rank, world, port)
    model = train_nft(
        nft_config(model_dir, epochs=2, lora_rank=4, train_batch_size=4), run_dir, reward=Redness()
    )
    torch.save(trainable(model), os.path.join(run_dir, f"params-{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_stay_in_sync_and_equal_one_with_accumulation(tmp_path, eps_model_dir):
    run = tmp_path / "ddp"
    run.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(eps_model_dir), str(run)), nprocs=2, join=True)
    rank0, rank1 = torch.load(run / "params-0.pt"), torch.load(run / "params-1.pt")
    assert rank0.keys() == rank1.keys() and all("lora" in k for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    cfg = nft_config(eps_model_dir, epochs=2, lora_rank=4, train_batch_size=4)
    cfg.runtime.gradient_accumulation_steps = 2
    single = trainable(train_nft(cfg, tmp_path / "single", reward=Redness()))
    for name, value in single.items():
        assert torch.allclose(value, rank0[name], rtol=1e-4, atol=1e-6), name
