"""Reward-gradient guidance on the predicted x0, DPS style (Chung et al. 2023, "Diffusion Posterior
Sampling", Algorithm 1, with the measurement log-likelihood replaced by a reward).

After each sampler step x_t -> x'_{t-1}, the step is nudged up the reward of the x0 prediction:

    x_{t-1} = x'_{t-1} + rho_t g / rms(g),   g = grad_{x_t} r(decode(x0_hat(x_t))),

differentiating through the denoiser (DPS's eq. 16 with -||y - A(x0_hat)|| replaced by r). The gradient is
divided by its per-sample root-mean-square (DPS likewise normalises its step by the residual norm),
so rho_t is the RMS change per latent entry. The scale schedule rho_t: "constant" (rho), "increasing"
(rho (i + 1) / S) or "decreasing" (rho (S - i) / S), for step i of S.

Where the gradient is taken (`gradient`):
- "denoiser" (DPS): g = grad_{x_t} r(decode(x0_hat(x_t))), through the denoiser's Jacobian.
- "x0": g = grad_{x0} r(decode(x0)) at x0 = x0_hat, the denoiser's Jacobian left out, as manifold-
  preserving guided diffusion does (He et al. 2024, "Manifold Preserving Guided Diffusion", Alg. 2
  without its optional autoencoder projection). A DDIM/Euler step is affine in x0_hat at fixed eps
  hat, so moving x0_hat by c g moves x_{t-1} by a positive multiple of c g; after the RMS
  normalisation above that is the same update rho_t g / rms(g). No backward pass through the
  denoiser: a guided chain costs what a plain one does (plus one reward backward per step).

Needs a differentiable reward (refused otherwise). Cost per chain: S forward passes through the
denoiser (2 S with classifier-free guidance), S backward passes as well with gradient "denoiser",
and one reward call and one reward backward per step. A budget larger than one guided chain draws
`num_samples` guided chains and keeps the best by the reward at the end (best-of-n over guided
samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig, StepInfo, sample
from diffalign.rewards.protocol import Reward, require_differentiable
from diffalign.steer.budget import BACKWARD_COST, plain_nfe, units
from diffalign.steer.common import (
    PromptRandomness,
    Session,
    SteerResult,
    best_per_prompt,
    initial_noise,
    score,
)

SCALE_SCHEDULES = ("constant", "increasing", "decreasing")
GRADIENT_MODES = ("denoiser", "x0")


@dataclass
class GuidanceConfig:
    """Reward-gradient guidance.

    Attributes:
        scale: rho, the RMS latent change per step at the schedule's peak.
        schedule: "constant", "increasing" or "decreasing" (see the module doc).
        num_samples: guided chains per prompt; the best by the reward is kept.
        seed: chain j of prompt i uses seed `seed + i * num_samples + j`.
        gradient: "denoiser" (DPS: through the denoiser) or "x0" (the reward's gradient at the x0
            prediction, no backward pass through the denoiser); see the module doc.
    """

    scale: float = 0.05
    schedule: str = "constant"
    num_samples: int = 1
    seed: int = 0
    gradient: str = "denoiser"

    def __post_init__(self) -> None:
        if self.scale < 0:
            raise ValueError(f"scale must be >= 0, got {self.scale}")
        if self.schedule not in SCALE_SCHEDULES:
            raise ValueError(f"schedule must be one of {SCALE_SCHEDULES}, got {self.schedule!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {self.gradient!r}")

    @staticmethod
    def chain_cost(sampler: SamplerConfig, gradient: str = "denoiser") -> int:
        """Forward-NFE equivalents of one guided chain: S forwards (x2 with CFG), plus as many
        backwards when the gradient goes through the denoiser."""
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
        return plain_nfe(sampler) * (1 + BACKWARD_COST if gradient == "denoiser" else 1)

    @classmethod
    def from_budget(cls, budget_nfe: int, sampler: SamplerConfig, **overrides) -> GuidanceConfig:
        """As many guided chains as fit in `budget_nfe` NFEs per prompt."""
        cost = cls.chain_cost(sampler, str(overrides.get("gradient", "denoiser")))
        count = units(budget_nfe, cost, "reward guidance (one guided chain)")
        return cls(num_samples=count, **overrides)

    def step_scale(self, step: int, num_steps: int) -> float:
        """rho_t for step `step` of `num_steps`."""
        if self.schedule == "increasing":
            return self.scale * (step + 1) / num_steps
        if self.schedule == "decreasing":
            return self.scale * (num_steps - step) / num_steps
        return self.scale


def reward_guidance(
    model: DiffusionModel,
    prompts: Sequence[str],
    reward: Reward,
    sampler: SamplerConfig,
    config: GuidanceConfig,
    prompt_seeds: Sequence[int] | None = None,
) -> SteerResult:
    """Sample with reward-gradient guidance (module doc); needs a differentiable reward. `prompt_seeds`
    gives each prompt its own seed (`PromptRandomness`)."""
    require_differentiable(reward, "reward guidance")
    run = Session(model, reward, prompts)
    num, n = len(run.prompts), config.num_samples
    flat_prompts = [p for p in run.prompts for _ in range(n)]
    seeds = PromptRandomness(config.seed, num, prompt_seeds).candidate_seeds(n)
    through_denoiser = config.gradient == "denoiser"
    x_T = initial_noise(run.model, seeds).requires_grad_(through_denoiser)

    def callback(info: StepInfo) -> Tensor:
        x0 = info.output.x0_pred if through_denoiser else info.output.x0_pred.detach().requires_grad_(True)
        images = run.model.decode(x0).clamp(0, 1)
        value = run.reward(images, flat_prompts).sum()
        (grad,) = torch.autograd.grad(value, info.x_t if through_denoiser else x0)
        rms = grad.flatten(1).pow(2).mean(dim=1).sqrt().clamp(min=1e-12)
        step = config.step_scale(info.step_index, info.num_steps) * grad / rms.view(-1, 1, 1, 1)
        prev = (info.output.prev + step).detach()
        last = info.step_index == info.num_steps - 1
        return prev if last or not through_denoiser else prev.requires_grad_(True)

    with torch.enable_grad():
        traj = sample(
            run.model,
            flat_prompts,
            config=sampler,
            seeds=seeds,
            latents=x_T,
            grad_steps="all" if through_denoiser else None,
            callback=callback,
            decode=False,
        )
    finals = traj.final_latents
    rewards = score(run.reward, run.model, finals, flat_prompts)
    best = best_per_prompt(rewards, num)
    images = run.model.decode(finals[best]).clamp(0, 1)
    return run.result(
        "guidance",
        finals[best],
        images,
        rewards[best],
        num_samples=n,
        scale=config.scale,
        gradient=config.gradient,
    )
