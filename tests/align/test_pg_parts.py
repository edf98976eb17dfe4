"""The pieces of policy-gradient fine-tuning against independent computations: advantages, the PPO
loss, the KL of two Gaussian steps, prompt sources, training pairs."""

import numpy as np
import pytest
import torch

from diffalign.align.advantages import (
    PerPromptStatTracker,
    clip_advantages,
    flat_group_fraction,
    group_advantages,
)
from diffalign.align.pg_config import PGConfig
from diffalign.align.pg_losses import gaussian_mean_kl, ppo_clip_loss
from diffalign.align.pg_rollout import Rollout, epoch_sampler, group_initial_noise, training_pairs
from diffalign.align.prompts import PromptSourceError, load_prompt_source
from diffalign.diffusion.sampling import SamplerConfig
from diffalign.world.grammar import parse_prompt


def test_group_advantages_standardise_within_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 0.3, 0.9, 0.1, 0.5])
    adv = group_advantages(rewards, 4)
    for g in range(3):
        block = rewards[4 * g : 4 * g + 4].numpy().astype(np.float64)
        expected = (block - block.mean()) / (block.std() + 1e-4)
        assert np.allclose(adv[4 * g : 4 * g + 4].numpy(), expected, atol=1e-6)
    assert torch.equal(adv[4:8], torch.zeros(4))  # equal rewards carry no signal
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)
    assert flat_group_fraction(rewards, 4) == pytest.approx(1 / 3)  # the 2, 2, 2, 2 group
    assert flat_group_fraction(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2) == 1.0
    assert flat_group_fraction(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2) == 0.0


def test_stat_tracker_uses_batch_stats_until_min_count_then_the_prompts_buffer():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=3)
    prompts = ["a", "a", "b", "b"]
    first = tracker.update(prompts, torch.tensor([1.0, 3.0, 10.0, 20.0]))
    batch = np.array([1.0, 3.0, 10.0, 20.0])
    assert np.allclose(first.numpy(), (batch - batch.mean()) / (batch.std() + 1e-4), atol=1e-5)
    second = tracker.update(prompts, torch.tensor([5.0, 7.0, 30.0, 40.0]))
    a = np.array([3.0, 5.0, 7.0])  # the buffer keeps the last 3 of 1, 3, 5, 7
    b = np.array([20.0, 30.0, 40.0])
    assert np.allclose(second[:2].numpy(), ([5.0, 7.0] - a.mean()) / (a.std() + 1e-4), atol=1e-5)
    assert np.allclose(second[2:].numpy(), ([30.0, 40.0] - b.mean()) / (b.std() + 1e-4), atol=1e-5)
    restored = PerPromptStatTracker(buffer_size=3, min_count=3)
    restored.load_state_dict(tracker.state_dict())
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.equal(restored.update(prompts, rewards), tracker.update(prompts, rewards))
    assert torch.equal(clip_advantages(torch.tensor([-9.0, 0.5, 9.0]), 5.0), torch.tensor([-5.0, 0.5, 5.0]))


def test_ppo_clip_loss_matches_its_definition_and_stops_gradients_when_clipped():
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    new = torch.tensor([0.5, -0.5, 0.01, 0.5], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    out = ppo_clip_loss(new, old, adv, clip_range=0.2)
    rho = np.exp([0.5, -0.5, 0.01, 0.5])
    a = adv.numpy()
    expected = np.maximum(-a * rho, -a * np.clip(rho, 0.8, 1.2)).mean()
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.75)
    assert out.approx_kl.item() == pytest.approx(0.5 * np.mean(np.array([0.5, -0.5, 0.01, 0.5]) ** 2))
    out.loss.backward()
    # sample 0: A > 0 and rho > 1 + eps -> clipped, no gradient; sample 3: A < 0 and rho > 1 + eps ->
    # the unclipped term is larger and keeps its gradient -A rho / N
    assert new.grad[0] == 0
    assert new.grad[3].item() == pytest.approx(1.0 * rho[3] / 4, rel=1e-5)
    # sample 1: A > 0 and rho < 1 - eps: the unclipped (pessimistic) term keeps its gradient
    assert new.grad[1].item() == pytest.approx(-1.0 * rho[1] / 4, rel=1e-5)
    assert new.grad[2].item() == pytest.approx(2.0 * rho[2] / 4, rel=1e-5)  # inside the clip range


def test_gaussian_mean_kl_is_the_kl_of_two_gaussians_per_dimension():
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    std = torch.tensor([0.3, 0.7])
    got = gaussian_mean_kl(mean, ref, std)
    for i in range(2):
        p = torch.distributions.Normal(mean[i].flatten(), std[i])
        q = torch.distributions.Normal(ref[i].flatten(), std[i])
        assert got[i].item() == pytest.approx(torch.distributions.kl_divergence(p, q).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="std > 0"):
        gaussian_mean_kl(mean, ref, torch.tensor([0.3, 0.0]))


def test_prompt_sources(tmp_path):
    world = load_prompt_source("world")
    drawn = world.sample(50, torch.Generator().manual_seed(3))
    assert drawn == world.sample(50, torch.Generator().manual_seed(3))
    assert all(parse_prompt(p) for p in drawn) and len(set(drawn)) > 10
    assert len(load_prompt_source("shapeseval")) == 300
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n# a comment\ntwo squares\n")
    source = load_prompt_source(str(path))
    assert source.prompts == ("a red circle", "two squares")
    assert set(source.sample(20, torch.Generator().manual_seed(0))) == {"a red circle", "two squares"}
    with pytest.raises(PromptSourceError, match=r"missing\.txt"):
        load_prompt_source(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(PromptSourceError, match=r"empty\.txt.*no prompts"):
        load_prompt_source(str(tmp_path / "empty.txt"))


def test_training_pairs_take_a_fraction_of_each_samples_stochastic_steps():
    stochastic = torch.tensor([True, True, True, True, True, False])
    rollout = Rollout(
        ["p"] * 3,
        torch.zeros(3, 7, 1, 1, 1),
        torch.zeros(3, 6),
        torch.zeros(7),
        stochastic,
        torch.zeros(3, 3, 1, 1),
        torch.zeros(3),
    )
    rows, cols = training_pairs(rollout, 0.6, seed=0, epoch=2, inner=0)
    assert len(rows) == 9  # round(0.6 * 5) = 3 steps per sample
    for i in range(3):
        steps = cols[rows == i]
        assert len(set(steps.tolist())) == 3 and (steps < 5).all()
    again = training_pairs(rollout, 0.6, seed=0, epoch=2, inner=0)
    assert torch.equal(again[0], rows) and torch.equal(again[1], cols)
    assert not torch.equal(training_pairs(rollout, 0.6, seed=0, epoch=2, inner=1)[1], cols)


def test_config_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        PGConfig(method="grpo", samples_per_prompt=1)
    with pytest.raises(ValueError, match="deterministic"):
        PGConfig(sampler="flow_euler")
    with pytest.raises(ValueError, match="kl_beta must be > 0"):
        PGConfig(method="dpok", kl_beta=0.0)
    with pytest.raises(ValueError, match="deterministic"):
        PGConfig(eta=0.0).sampler_config("epsilon")
    with pytest.raises(ValueError, match="flow model needs"):
        PGConfig(sampler="ddim").sampler_config("flow")
    assert PGConfig(method="grpo").resolved_kl_beta() == 0.04
    assert PGConfig().sampler_config("flow").sampler == "flow_sde"


def test_sde_window_config_and_epoch_windows():
    with pytest.raises(ValueError, match="sde_window_size must be in"):
        PGConfig(num_steps=4, sde_window_size=5)
    with pytest.raises(ValueError, match="needs sde_window_size > 0"):
        PGConfig(sde_window_range=(0, 3))
    with pytest.raises(ValueError, match="shorter than sde_window_size 3"):
        PGConfig(num_steps=10, sde_window_size=3, sde_window_range=(2, 4))
    with pytest.raises(ValueError, match="sde_window_range"):
        PGConfig(num_steps=10, sde_window_size=2, sde_window_range=(8, 12))
    assert PGConfig(num_steps=10, sde_window_size=2, sde_window_range=[1, 6]).sde_window_range == (1, 6)
    base = SamplerConfig(num_steps=10, eta=1.0)
    assert epoch_sampler(base, 0, None, seed=0, epoch=3) is base
    windows = [epoch_sampler(base, 2, (1, 6), seed=0, epoch=e).sde_window for e in range(60)]
    assert all(start >= 1 and end == start + 2 and end <= 6 for start, end in windows)
    assert {w[0] for w in windows} == {1, 2, 3, 4}  # every placement is drawn, uniformly enough to see all
    assert windows == [epoch_sampler(base, 2, (1, 6), seed=0, epoch=e).sde_window for e in range(60)]
    assert windows != [epoch_sampler(base, 2, (1, 6), seed=1, epoch=e).sde_window for e in range(60)]

    # MixGRPO's progressive window: from the range's start, one step later every 3 epochs
    def starts(**kw):
        return [
            epoch_sampler(base, 2, (1, 6), 0, e, schedule="progressive", **kw).sde_window[0]
            for e in range(15)
        ]

    assert starts(shift_every=3) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 4, 4]  # stays at the end
    assert starts(shift_every=3, roll_back=True) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 1, 1, 1]
    assert starts(shift_every=2, shift=2) == [1, 1, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]  # clamped to 4
    assert starts(shift_every=1, shift=2, roll_back=True)[:6] == [1, 3, 1, 3, 1, 3]
    with pytest.raises(ValueError, match="sde_window_schedule"):
        PGConfig(sde_window_size=2, sde_window_schedule="sliding")
    with pytest.raises(ValueError, match="must be >= 1"):
        PGConfig(sde_window_size=2, sde_window_shift=0)
    # the default range: every step that can be stochastic (DDIM's last step has no noise)
    assert [epoch_sampler(base, 9, None, seed=0, epoch=e).sde_window for e in range(3)] == [(0, 9)] * 3
    flow = SamplerConfig(sampler="flow_sde", num_steps=10)
    assert epoch_sampler(flow, 10, None, seed=0, epoch=0).sde_window == (0, 10)
    with pytest.raises(ValueError, match=r"only steps 0 \.\. 8 of 10 can be stochastic"):
        PGConfig(num_steps=10, sde_window_size=10).sampler_config("epsilon")
    with pytest.raises(ValueError, match=r"only steps 0 \.\. 8 of 10 can be stochastic"):
        PGConfig(num_steps=10, sde_window_size=2, sde_window_range=(5, 10)).sampler_config("epsilon")
    assert PGConfig(num_steps=10, sde_window_size=10).sampler_config("flow").sampler == "flow_sde"


def test_group_initial_noise_is_the_first_samples_first_draw():
    seeds = [5, 6, 7, 8, 9, 10]
    noise = group_initial_noise(seeds, per_prompt=3, shape=(2, 4, 4))
    for i, first in enumerate([5, 5, 5, 8, 8, 8]):
        expected = torch.randn((2, 4, 4), generator=torch.Generator().manual_seed(first))
        assert torch.equal(noise[i], expected)
    assert not torch.equal(noise[0], noise[3])
