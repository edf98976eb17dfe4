"""FK steering: potentials, telescoping final weights, adaptive resampling, and that it steers."""

import pytest
import torch

from diffalign.steer import FKConfig, fk_steering
from diffalign.steer.fk import FKState
from tests.steer.helpers import PROMPTS, Brightness, CountedGaussian, stochastic

LAM = 3.0
K = 4


def _fk(potential, prediction_type="epsilon", **overrides):
    values = dict(num_particles=K, potential=potential, lam=LAM, resample_every=1, resample_start=0)
    values.update(overrides)
    return fk_steering(
        CountedGaussian(prediction_type),
        PROMPTS,
        Brightness(),
        stochastic(prediction_type),
        FKConfig(**values),
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow"])
@pytest.mark.parametrize("potential", ["difference", "max", "sum", "final"])
def test_lineage_potentials_telescope_to_exp_lam_r(potential, prediction_type):
    """With resampling at every step, each final particle's product of potentials along its lineage
    is exp(lam r(x0)) (the weight the target p(x0) exp(lam r) needs)."""
    result = _fk(potential, prediction_type)
    assert result.info["resamplings"] > 0 or potential == "final"
    product = torch.tensor(result.info["log_potential_product"], dtype=torch.float64)
    rewards = torch.tensor(result.info["final_rewards"], dtype=torch.float64)
    assert torch.allclose(product, LAM * rewards, atol=1e-9)
    # the kept particle's reward is the reward of the returned image
    assert torch.allclose(result.rewards, Brightness()(result.images, PROMPTS), atol=1e-6)


@pytest.mark.parametrize("potential", ["difference", "max", "sum"])
def test_without_resampling_final_weights_are_exp_lam_r(potential):
    """No resampling (ESS never under 0.2 K < 1): the accumulated weights themselves telescope, and each
    intermediate potential is the formula applied to the rewards recorded at that step."""
    result = _fk(potential, ess_threshold=0.2)
    assert result.info["resamplings"] == 0
    history = result.info["history"]
    rewards = torch.tensor([h["rewards"] for h in history], dtype=torch.float64)  # [steps, B K]
    logs = torch.tensor([h["log_potential"] for h in history], dtype=torch.float64)
    inter = rewards[:-1]
    if potential == "difference":
        expected = LAM * (inter - torch.cat([torch.zeros_like(inter[:1]), inter[:-1]]))
    elif potential == "max":
        expected = LAM * torch.cummax(inter, dim=0).values
    else:
        expected = LAM * torch.cumsum(inter, dim=0)
    assert torch.allclose(logs[:-1], expected, atol=1e-9)
    # the last step divides out what came before: G_n = exp(lam r_n) / prod_{k<n} G_k. Adding r_n to the
    # running sum first (as the reference's sum potential does) would give lam (r_n + sum) - prod instead.
    assert torch.allclose(logs[-1], LAM * rewards[-1] - expected.sum(0), atol=1e-9)
    final = torch.tensor(result.info["final_log_weights"], dtype=torch.float64)
    assert torch.allclose(final, LAM * rewards[-1], atol=1e-9)


def test_adaptive_resampling_follows_the_ess_threshold():
    result = _fk("difference", lam=30.0, ess_threshold=0.75)
    for record in result.info["history"][:-1]:
        expected = [ess < 0.75 * K for ess in record["ess"]]
        assert record["resampled"] == expected
    assert any(any(r["resampled"]) for r in result.info["history"])
    assert not all(all(r["resampled"]) for r in result.info["history"][:-1])


def test_resampling_moves_particles_to_high_weights():
    state = FKState(FKConfig(num_particles=3, potential="difference", lam=100.0), num_prompts=2, device="cpu")
    rows = state.update(0, torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0, 0.0], dtype=torch.float64), final=False)
    assert rows.tolist()[:3] == [1, 1, 1] and rows.tolist()[3:] == [3, 3, 3]
    assert torch.equal(state.log_w, torch.zeros(6, dtype=torch.float64))  # reset after resampling
    assert torch.allclose(state.log_prod, torch.tensor([100.0] * 3 + [50.0] * 3, dtype=torch.float64))
    assert torch.allclose(state.last, torch.tensor([1.0] * 3 + [0.5] * 3, dtype=torch.float64))


def test_fk_steers_towards_the_reward():
    """Sampling a particle from the final weights (not picking the best) still raises the mean reward
    over plain sampling (FK with one particle is plain sampling)."""
    prompts = ["a"] * 24
    reward = Brightness()
    sampler = stochastic("epsilon")

    def run(k, seed):
        config = FKConfig(
            num_particles=k,
            potential="difference",
            lam=10.0,
            resample_every=1,
            resample_start=0,
            select="sample",
            seed=seed,
        )
        return fk_steering(CountedGaussian(), prompts, reward, sampler, config).rewards.mean()

    plain = torch.stack([run(1, s) for s in range(3)]).mean()
    steered = torch.stack([run(8, s) for s in range(3)]).mean()
    assert steered > plain + 0.05
