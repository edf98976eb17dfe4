"""Every method: reproducible, black boxes never differentiated, gradient methods refuse them, and each
raises the reward it steers by on epsilon, v and flow models."""

import itertools
import math

import pytest
import torch

from diffalign.rewards.protocol import NotDifferentiableError
from diffalign.steer import (
    BestOfNConfig,
    DNOConfig,
    FKConfig,
    GuidanceConfig,
    SearchConfig,
    SVDDConfig,
    run_method,
)
from diffalign.steer.dno import regularizer
from diffalign.steer.search import sphere_neighbors
from tests.steer.helpers import PROMPTS, BlackBox, Brightness, CountedGaussian, deterministic, stochastic

CASES = {
    "bon": (BestOfNConfig(n=3), stochastic),
    "search-random": (SearchConfig(mode="random", num_chains=3), deterministic),
    "search-zero-order": (SearchConfig(num_chains=5, neighbors=2), deterministic),
    "fk": (FKConfig(num_particles=3, resample_every=2, resample_start=0), stochastic),
    "svdd": (SVDDConfig(num_candidates=3), stochastic),
    "dno-zero-order": (DNOConfig(mode="zero_order", iterations=2, perturbations=2), stochastic),
    "guidance": (GuidanceConfig(scale=0.2), stochastic),
    "guidance-x0": (GuidanceConfig(scale=0.2, gradient="x0"), stochastic),
    "dno": (DNOConfig(iterations=2), stochastic),
}
BLACK_BOX = ["bon", "search-random", "search-zero-order", "fk", "svdd", "dno-zero-order"]


def _run(case, reward, prediction_type="epsilon", seed=0, prompts=PROMPTS):
    config, make_sampler = CASES[case]
    config = type(config)(**{**vars(config), "seed": seed})
    method = case.split("-")[0]
    model = CountedGaussian(prediction_type)
    return run_method(method, model, prompts, reward, make_sampler(prediction_type), config)


@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_result(case):
    first, second = _run(case, Brightness()), _run(case, Brightness())
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.rewards, second.rewards)
    other = _run(case, Brightness(), seed=7)
    assert not torch.equal(first.images, other.images)


@pytest.mark.parametrize("case", BLACK_BOX)
def test_black_box_methods_never_call_backward(case):
    result = _run(case, BlackBox())  # its backward raises
    assert result.usage.grad_nfe == 0 and result.usage.reward_grads == 0
    assert torch.isfinite(result.rewards).all()


@pytest.mark.parametrize("case", ["guidance", "guidance-x0", "dno"])
def test_gradient_methods_refuse_black_boxes(case):
    with pytest.raises(NotDifferentiableError, match="black-box"):
        _run(case, BlackBox())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_methods_beat_plain_sampling_on_every_model_family(case, prediction_type):
    """Over 24 prompts, the steered samples' mean reward beats plain sampling's (estimated from 32
    samples per prompt)."""
    from diffalign.diffusion import sample

    reward = Brightness()
    prompts = PROMPTS * 8
    result = _run(case, reward, prediction_type, seed=0, prompts=prompts)
    assert torch.allclose(result.rewards, reward(result.images, prompts), atol=1e-5)
    steered = result.rewards.mean()
    prompts = PROMPTS * 32
    sampler = CASES[case][1](prediction_type)
    plain = sample(
        CountedGaussian(prediction_type), prompts, config=sampler, seeds=range(len(prompts))
    ).images
    assert steered > reward(plain, prompts).mean()


def test_guidance_scale_moves_the_reward():
    rewards = [_run_guidance(scale) for scale in (0.0, 0.1, 0.3)]
    assert rewards[0] < rewards[1] < rewards[2]


def _run_guidance(scale):
    config = GuidanceConfig(scale=scale, schedule="increasing")
    return run_method(
        "guidance", CountedGaussian(), PROMPTS, Brightness(), stochastic("epsilon"), config
    ).rewards.mean()


def test_dno_gradient_iterations_raise_the_reward():
    config = DNOConfig(iterations=4, lr=0.2)
    result = run_method("dno", CountedGaussian(), PROMPTS, Brightness(), stochastic("epsilon"), config)
    history = result.info["history"]
    assert history[-1] > history[0]
    assert all(b >= a - 1e-6 for a, b in itertools.pairwise(history))


def test_search_and_fk_refuse_the_wrong_sampler():
    with pytest.raises(ValueError, match="deterministic sampler"):
        run_method("search", CountedGaussian(), PROMPTS, Brightness(), stochastic("epsilon"), SearchConfig())
    for method, config in [("fk", FKConfig()), ("svdd", SVDDConfig()), ("dno", DNOConfig())]:
        with pytest.raises(ValueError, match="stochastic sampler"):
            run_method(method, CountedGaussian(), PROMPTS, Brightness(), deterministic("epsilon"), config)


def test_sphere_neighbours_keep_the_norm_and_the_angle():
    pivot = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    points = sphere_neighbors(pivot, 5, 0.9, torch.Generator().manual_seed(1))
    norms = points.flatten(1).norm(dim=1)
    assert torch.allclose(norms, pivot.norm().expand(5), rtol=1e-5)
    cosines = points.flatten(1) @ pivot.flatten() / (norms * pivot.norm())
    assert torch.allclose(cosines, torch.full((5,), 0.9), atol=1e-5)
    assert not torch.allclose(points[0], points[1])


def test_regularizer_prefers_gaussian_noise():
    g = torch.Generator().manual_seed(0)
    permutation = torch.randperm(4096, generator=g)
    gaussian = torch.randn(8, 4096, generator=g)
    reg = regularizer(gaussian, permutation, 4)
    # for true N(0, I) draws E[R] = d / 2 + (d^2 + d) / 4 = 7 at d = 4 (independent of the block count)
    assert abs(float(reg.mean()) - 7.0) < 2.0
    assert (regularizer(1.5 * gaussian, permutation, 4) > 10 * reg).all()
    assert (regularizer(gaussian + 0.3, permutation, 4) > 10 * reg).all()
    assert math.isfinite(float(reg.sum()))


def test_configs_refuse_a_batch_size_or_resample_stop_that_cannot_work():
    from diffalign.steer import BestOfNConfig, FKConfig, SearchConfig

    # batch_size 0 failed mid-run with "range() arg 3 must not be zero", -1 with an empty torch.cat
    for config_cls in (BestOfNConfig, SearchConfig):
        for size in (0, -1):
            with pytest.raises(ValueError, match="batch_size must be >= 1"):
                config_cls(batch_size=size)
    with pytest.raises(ValueError, match="resample_stop must be None or >= 0"):
        FKConfig(resample_stop=-1)  # silently meant "never resample"
