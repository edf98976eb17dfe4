"""CostMeter: exact denoiser-row counts, backward counts, reward counts, memory, and run-folder sums."""

from __future__ import annotations

import json
import time

import pytest
import torch

from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.evaluate.costs import (
    STATM,
    CostMeter,
    StageCost,
    add_run_costs,
    denoiser_types,
    read_run_costs,
)
from diffalign.models.tiny import TinyDiffusionModel
from diffalign.rewards.protocol import as_reward


@pytest.fixture(scope="module")
def model() -> TinyDiffusionModel:
    torch.manual_seed(0)
    return TinyDiffusionModel.create("epsilon", "unet-xs", 16)


def test_guided_sampling_counts_two_rows_per_sample_and_step(model):
    config = SamplerConfig(sampler="ddim", num_steps=3, guidance_scale=2.0)
    with CostMeter(denoiser_types()) as meter, torch.no_grad():
        sample(model, ["a circle"] * 5, config=config, seeds=list(range(5)))
    assert meter.cost.forward_nfe == 5 * 3 * 2
    assert meter.cost.backward_nfe == 0
    assert meter.cost.wall_s > 0


def test_unguided_rows_and_backward_rows(model):
    config = SamplerConfig(sampler="ddim", num_steps=4, guidance_scale=1.0)
    with CostMeter((type(model.denoiser),)) as meter:
        with torch.no_grad():
            sample(model, ["a square"] * 3, config=config, seeds=[0, 1, 2])
        assert meter.cost.forward_nfe == 3 * 4
        x = torch.randn(2, *model.latent_shape)
        t = torch.tensor([10, 20])
        out = model.predict(x, t, model.encode_prompts(["a circle", "a square"]))
        assert meter.cost.forward_nfe == 3 * 4 + 2
        assert meter.cost.backward_nfe == 0  # not yet backpropagated
        out.square().mean().backward()
    assert meter.cost.backward_nfe == 2


def test_calls_outside_the_meter_are_not_counted(model):
    meter = CostMeter(denoiser_types())
    with meter:
        pass
    with torch.no_grad():
        model.predict(
            torch.randn(1, *model.latent_shape), torch.tensor([5]), model.encode_prompts(["a circle"])
        )
    assert meter.cost.forward_nfe == 0


def test_other_modules_are_not_counted():
    net = torch.nn.Linear(3, 3)
    with CostMeter(denoiser_types()) as meter:
        net(torch.randn(4, 3))
    assert meter.cost.forward_nfe == 0


def test_reward_queries_and_gradients():
    reward = as_reward(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="mean", differentiable=True)
    with CostMeter(denoiser_types()) as meter:
        counted = meter.count_reward(reward)
        images = torch.rand(6, 3, 8, 8, requires_grad=True)
        counted(images, ["p"] * 6).sum().backward()
        with torch.no_grad():
            counted(torch.rand(2, 3, 8, 8), ["p"] * 2)
    assert meter.cost.reward_queries == 8
    assert meter.cost.reward_grads == 6
    assert counted.name == "mean" and counted.differentiable


@pytest.mark.skipif(not STATM.is_file(), reason="RSS is read from /proc (Linux)")
def test_cpu_peak_memory_sees_a_large_allocation():
    with CostMeter(denoiser_types(), sample_every_s=0.005) as meter:
        block = torch.ones(64, 2**20 // 4 * 4)  # 256 MiB of float32
        block.add_(1)
        time.sleep(0.05)
        del block
    assert meter.cost.memory_kind == "cpu-rss"
    assert meter.cost.peak_memory_mb is not None and meter.cost.peak_memory_mb > 200


def test_run_costs_add_up_over_resumed_sessions(tmp_path):
    first = StageCost(
        wall_s=2.0,
        forward_nfe=10,
        backward_nfe=4,
        reward_queries=3,
        peak_memory_mb=50.0,
        memory_kind="cpu-rss",
    )
    second = StageCost(
        wall_s=1.0,
        forward_nfe=5,
        backward_nfe=1,
        reward_queries=2,
        peak_memory_mb=80.0,
        memory_kind="cpu-rss",
    )
    add_run_costs(tmp_path, first)
    total = add_run_costs(tmp_path, second)
    assert total == json.loads((tmp_path / "costs.json").read_text())
    assert total["wall_s"] == 3.0 and total["forward_nfe"] == 15 and total["backward_nfe"] == 5
    assert total["reward_queries"] == 5 and total["peak_memory_mb"] == 80.0 and total["sessions"] == 2
    assert total["processes"] == 1
    # a session of two processes (one measured): recorded as the most processes of any session
    assert add_run_costs(tmp_path, second, processes=2)["processes"] == 2
    assert add_run_costs(tmp_path, second)["processes"] == 2


def test_every_process_writes_its_own_costs_and_the_reader_adds_them_up(tmp_path):
    main = StageCost(wall_s=10.0, forward_nfe=8, backward_nfe=4, reward_queries=3, peak_memory_mb=100.0)
    other = StageCost(wall_s=9.5, forward_nfe=6, backward_nfe=2, reward_queries=5, peak_memory_mb=120.0)
    assert read_run_costs(tmp_path) is None  # no costs.json: no costs
    add_run_costs(tmp_path, main, processes=2, rank=0)
    add_run_costs(tmp_path, other, processes=2, rank=1)
    assert (tmp_path / "costs-rank-1.json").is_file()
    assert json.loads((tmp_path / "costs.json").read_text())["forward_nfe"] == 8  # each file its own
    total = read_run_costs(tmp_path)
    assert (total["forward_nfe"], total["backward_nfe"], total["reward_queries"]) == (14, 6, 8)
    assert total["wall_s"] == 10.0  # the main process's wall time is the run's
    assert total["peak_memory_mb"] == 120.0 and total["processes_counted"] == 2
    # a resumed session adds to each process's own file
    add_run_costs(tmp_path, other, processes=2, rank=1)
    assert read_run_costs(tmp_path)["forward_nfe"] == 8 + 12
    # a process that did not count its rewards leaves the total unknown, not short
    add_run_costs(tmp_path, other, rewards_counted=False, processes=3, rank=2)
    assert read_run_costs(tmp_path)["reward_queries"] is None
    (tmp_path / "costs-rank-2.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"costs-rank-2\.json"):
        read_run_costs(tmp_path)


def test_uncounted_rewards_are_null_not_zero(tmp_path):
    total = add_run_costs(tmp_path, StageCost(forward_nfe=3, reward_queries=0), rewards_counted=False)
    assert total["reward_queries"] is None and total["reward_grads"] is None
    again = add_run_costs(tmp_path, StageCost(forward_nfe=3))
    assert again["reward_queries"] is None and again["forward_nfe"] == 6


def test_a_meter_needs_network_types():
    with pytest.raises(ValueError, match="denoiser network class"):
        CostMeter(())
