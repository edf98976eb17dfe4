"""Exact compute accounting: every method's counts against an independent count and a closed form."""

import pytest

from diffalign.steer import (
    BestOfNConfig,
    DNOConfig,
    FKConfig,
    GuidanceConfig,
    SearchConfig,
    SVDDConfig,
    plain_nfe,
    run_method,
)
from diffalign.steer.budget import BACKWARD_COST
from tests.steer.helpers import PROMPTS, Brightness, CountedGaussian, deterministic, stochastic

S = 6  # steps; with guidance a plain chain is 2 S = 12 NFEs per prompt
B = len(PROMPTS)


def _run(method, config, sampler, prediction_type="epsilon"):
    model, reward = CountedGaussian(prediction_type), Brightness()
    result = run_method(method, model, PROMPTS, reward, sampler, config)
    # the package's own counts agree with the model's and the reward's independent counters
    assert result.usage.nfe == model.rows
    assert result.usage.reward_calls == reward.calls
    return result.usage


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_black_box_counts_match_closed_forms(prediction_type):
    chain = 2 * S
    usage = _run("bon", BestOfNConfig(n=3), stochastic(prediction_type), prediction_type)
    assert (usage.nfe, usage.reward_calls, usage.grad_nfe) == (3 * chain * B, 3 * B, 0)

    usage = _run(
        "search", SearchConfig(num_chains=5, neighbors=3), deterministic(prediction_type), prediction_type
    )
    assert (usage.nfe, usage.reward_calls) == (5 * chain * B, 5 * B)

    fk = FKConfig(num_particles=4, resample_every=2, resample_start=1)
    usage = _run("fk", fk, stochastic(prediction_type), prediction_type)
    assert fk.potential_steps(S) == [1, 3, 5]
    assert (usage.nfe, usage.reward_calls) == (4 * chain * B, 4 * 3 * B)


def test_svdd_counts():
    usage = _run("svdd", SVDDConfig(num_candidates=3), stochastic("epsilon"))
    # the last DDIM step to abar = 1 is deterministic: no candidates there; one final score per prompt
    assert usage.nfe == (2 * S + (S - 1) * 3 * 2) * B == SVDDConfig.cost(stochastic("epsilon"), 3) * B
    assert usage.reward_calls == ((S - 1) * 3 + 1) * B


def test_gradient_methods_count_backward_passes():
    usage = _run("guidance", GuidanceConfig(num_samples=2), stochastic("epsilon"))
    assert usage.nfe == usage.grad_nfe == 2 * 2 * S * B
    assert usage.reward_grads == 2 * S * B
    assert usage.cost == GuidanceConfig.chain_cost(stochastic("epsilon")) * 2 * B

    # gradient at the x0 prediction: no backward pass through the denoiser, one reward backward per step
    usage = _run("guidance", GuidanceConfig(num_samples=2, gradient="x0"), stochastic("epsilon"))
    assert usage.nfe == 2 * 2 * S * B and usage.grad_nfe == 0
    assert usage.reward_grads == 2 * S * B
    assert usage.cost == GuidanceConfig.chain_cost(stochastic("epsilon"), "x0") * 2 * B == 2 * 2 * S * B

    config = DNOConfig(iterations=3)
    usage = _run("dno", config, stochastic("epsilon"))
    assert usage.nfe == 3 * 2 * S * B and usage.grad_nfe == 2 * 2 * S * B
    assert usage.cost == config.cost(stochastic("epsilon")) * B == (3 + 2 * BACKWARD_COST) * 2 * S * B

    config = DNOConfig(mode="zero_order", iterations=2, perturbations=3)
    usage = _run("dno", config, stochastic("epsilon"))
    assert usage.nfe == (2 + 3) * 2 * S * B == config.cost(stochastic("epsilon")) * B
    assert usage.grad_nfe == 0


@pytest.mark.parametrize(
    ("method", "budget", "field", "expected"),
    [
        ("bon", 4 * 12, "n", 4),
        ("search", 8 * 12 + 5, "num_chains", 8),
        ("fk", 4 * 12, "num_particles", 4),
        ("guidance", 8 * 12, "num_samples", 2),  # a guided chain costs 3 plain chains
        ("guidance-x0", 8 * 12, "num_samples", 8),  # no denoiser backward: as a plain chain
        ("svdd", 8 * 12, "num_candidates", 8),  # (96 - 12) // ((S - 1) * 2) = 8
        ("dno", 8 * 12, "iterations", 3),  # 12 + 2 * (12 + 24) = 84 <= 96
    ],
)
def test_budgets_size_methods_and_are_not_exceeded(method, budget, field, expected):
    from diffalign.steer import make_config

    sampler = stochastic("epsilon") if method != "search" else deterministic("epsilon")
    method, options = ("guidance", {"gradient": "x0"}) if method == "guidance-x0" else (method, {})
    config = make_config(method, budget, sampler, **options)
    assert getattr(config, field) == expected
    usage = _run(method, config, sampler)
    per_prompt = usage.cost / B
    assert per_prompt <= budget + (1 * 2 if method == "svdd" else 0)  # svdd's final scoring costs no NFE
    assert per_prompt > budget - 3 * plain_nfe(sampler)


@pytest.mark.parametrize("method", ["bon", "fk", "guidance", "svdd", "dno"])
def test_too_small_a_budget_is_refused(method):
    from diffalign.steer import make_config

    with pytest.raises(ValueError, match="too small"):
        make_config(method, 5, stochastic("epsilon"))


@pytest.mark.parametrize(
    "method, field", [("bon", "n"), ("search", "num_chains"), ("fk", "num_particles"), ("dno", "iterations")]
)
def test_a_budget_and_the_field_it_sizes_are_not_both_accepted(method, field):
    from diffalign.steer import make_config

    sampler = deterministic("epsilon") if method == "search" else stochastic("epsilon")
    # DNO used to drop the given iterations silently; the others failed with "multiple values for 'n'"
    with pytest.raises(ValueError, match=rf"{field}=2 and budget_nfe=400 both set {field}"):
        make_config(method, 400, sampler, **{field: 2})
    assert getattr(make_config(method, None, sampler, **{field: 2}), field) == 2


def test_svdd_with_one_step_cannot_be_sized_by_a_budget():
    from diffalign.steer import make_config

    # the message used to say a budget of 2 was too small because it needs at least 2
    with pytest.raises(ValueError, match="cannot size SVDD with 1 sampling step"):
        make_config("svdd", 100, stochastic("epsilon", steps=1))
