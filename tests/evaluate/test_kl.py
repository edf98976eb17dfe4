"""The trajectory KL estimate against an analytic Gaussian case."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from diffalign.diffusion.protocol import Conditioning
from diffalign.diffusion.sampling import SamplerConfig
from diffalign.diffusion.schedules import DDPMSchedule
from diffalign.evaluate.kl import kl_from_log_probs, kl_to_base


class ConstantEpsModel:
    """An epsilon model that predicts the constant `c` everywhere: every DDIM step is Gaussian with a
    mean affine in x_t, and two such models' step means differ by the same constant for every x_t."""

    prediction_type = "epsilon"
    latent_shape = (3, 4, 4)

    def __init__(self, c: float) -> None:
        self.c = c
        self._schedule = DDPMSchedule()

    @property
    def schedule(self) -> DDPMSchedule:
        return self._schedule

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode_prompts(self, prompts):
        return Conditioning({"ids": torch.zeros(len(prompts), 1)})

    def predict(self, x_t, t, cond):
        return torch.full_like(x_t, self.c)

    reference_predict = predict

    def decode(self, latents):
        return latents


def analytic_kl(c_model: float, c_base: float, config: SamplerConfig, schedule: DDPMSchedule) -> float:
    """sum_t D (k_t (c_model - c_base))^2 / (2 sigma_t^2) over steps with sigma_t > 0, where
    DDIM's mean (Song et al. 2021 eq. 12) has eps-coefficient
    k_t = sqrt(1 - abar_prev - sigma^2) - sqrt(abar_prev) sqrt(1 - abar_t) / sqrt(abar_t)."""
    ts = config.timesteps(schedule).tolist()
    abar = schedule.alphas_cumprod.tolist()
    dims = 3 * 4 * 4
    total = 0.0
    for t, t_prev in itertools.pairwise(ts):
        a_t = abar[int(t)]
        a_p = abar[int(t_prev)] if t_prev >= 0 else 1.0
        sigma2 = config.eta**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        if sigma2 <= 0:
            continue
        k = math.sqrt(1 - a_p - sigma2) - math.sqrt(a_p) * math.sqrt(1 - a_t) / math.sqrt(a_t)
        total += dims * (k * (c_model - c_base)) ** 2 / (2 * sigma2)
    return total


def test_kl_estimate_matches_the_analytic_gaussian_kl():
    config = SamplerConfig(sampler="ddim", num_steps=4, eta=1.0)
    model, base = ConstantEpsModel(0.05), ConstantEpsModel(0.0)
    expected = analytic_kl(0.05, 0.0, config, model.schedule)
    assert expected > 0.5  # a KL the estimate must resolve, not a vanishing one
    est = kl_to_base(model, base, ["p"] * 400, config, batch_size=200)
    assert est.n == 400
    assert abs(est.kl - expected) < 4 * est.stderr
    assert est.stderr < 0.2 * expected
    assert est.sqrt_kl == pytest.approx(math.sqrt(est.kl))


def test_kl_of_a_model_to_itself_is_zero():
    config = SamplerConfig(sampler="ddpm", num_steps=3)
    est = kl_to_base(ConstantEpsModel(0.1), ConstantEpsModel(0.1), ["p"] * 8, config)
    assert est.kl == pytest.approx(0.0, abs=1e-6)


def test_kl_needs_a_stochastic_sampler():
    with pytest.raises(ValueError, match="stochastic"):
        kl_to_base(
            ConstantEpsModel(0.1), ConstantEpsModel(0.0), ["p"], SamplerConfig(sampler="ddim", eta=0.0)
        )


def test_kl_from_log_probs_scales_per_dimension_values():
    own = torch.tensor([[0.2, 0.1], [0.4, 0.1]])
    ref = torch.zeros(2, 2)
    est = kl_from_log_probs(own, ref, dims=10)
    assert est.per_chain == pytest.approx([3.0, 5.0])
    assert est.kl == pytest.approx(4.0)
    assert est.stderr == pytest.approx(math.sqrt(2.0) / math.sqrt(2))
