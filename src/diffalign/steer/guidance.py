"""Reward-gradient guidance on the predicted x0, DPS style (Chung et al. 2023, "Diffusion Posterior
Sampling", Algorithm 1, with the measurement log-likelihood replaced by a reward).

After each sampler step x_t -> x'_{t-1}, the step is nudged up the reward of the x0 prediction:

    x_{t-1} = x'_{t-1} + rho_t g / rms(g),   g = grad_{x_t} r(decode(x0_hat(x_t))),

differentiating through the denoiser (DPS's eq. 16 with -||y - A(x0_hat)|| replaced by r). The gradient is
divided by its per-sample root-mean-square (DPS likewise normalises its step by the residual norm),
so rho_t is the RMS change per latent entry. The scale schedule rho_t: "constant" (rho), "increasing"
(rho (i + 1) / S) or "decreasing" (rho (S - i) / S), for step i of S.

Needs a differentiable reward (refused otherwise). Cost per chain: S forward and S backward passes
through the denoiser (2 S each with classifier-free guidance), one reward call and one reward
backward per step. A budget larger than one guided chain draws `num_samples` guided chains and keeps
the best by the reward at the end (best-of-n over guided samples).
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
    Session,
    SteerResult,
    best_per_prompt,
    candidate_seeds,
    initial_noise,
    score,
)

SCALE_SCHEDULES = ("constant", "increasing", "decreasing")


@dataclass
class GuidanceConfig:
    """Reward-gradient guidance.

    Attributes:
        scale: rho, the RMS latent change per step at the schedule's peak.
        schedule: "constant", "increasing" or "decreasing" (see the module doc).
        num_samples: guided chains per prompt; the best by the reward is kept.
        seed: chain j of prompt i uses seed `seed + i * num_samples + j`.
    """

    scale: float = 0.05
    schedule: str = "constant"
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scale < 0:
            raise ValueError(f"scale must be >= 0, got {self.scale}")
        if self.schedule not in SCALE_SCHEDULES:
            raise ValueError(f"schedule must be one of {SCALE_SCHEDULES}, got {self.schedule!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")

    @staticmethod
    def chain_cost(sampler: SamplerConfig) -> int:
        """Forward-NFE equivalents of one guided chain: S forwards + S backwards (x2 with CFG)."""
        return plain_nfe(sampler) * (1 + BACKWARD_COST)

    @classmethod
    def from_budget(cls, budget_nfe: int, sampler: SamplerConfig, **overrides) -> GuidanceConfig:
        """As many guided chains as fit in `budget_nfe` NFEs per prompt."""
        count = units(budget_nfe, cls.chain_cost(sampler), "reward guidance (one guided chain)")
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
) -> SteerResult:
    """Sample with reward-gradient guidance (module doc); needs a differentiable reward."""
    require_differentiable(reward, "reward guidance")
    run = Session(model, reward, prompts)
    num, n = len(run.prompts), config.num_samples
    flat_prompts = [p for p in run.prompts for _ in range(n)]
    seeds = candidate_seeds(config.seed, num, n)
    x_T = initial_noise(run.model, seeds).requires_grad_(True)

    def callback(info: StepInfo) -> Tensor:
        images = run.model.decode(info.output.x0_pred).clamp(0, 1)
        value = run.reward(images, flat_prompts).sum()
        (grad,) = torch.autograd.grad(value, info.x_t)
        rms = grad.flatten(1).pow(2).mean(dim=1).sqrt().clamp(min=1e-12)
        step = config.step_scale(info.step_index, info.num_steps) * grad / rms.view(-1, 1, 1, 1)
        prev = (info.output.prev + step).detach()
        return prev if info.step_index == info.num_steps - 1 else prev.requires_grad_(True)

    with torch.enable_grad():
        traj = sample(
            run.model,
            flat_prompts,
            config=sampler,
            seeds=seeds,
            latents=x_T,
            grad_steps="all",
            callback=callback,
            decode=False,
        )
    finals = traj.final_latents
    rewards = score(run.reward, run.model, finals, flat_prompts)
    best = best_per_prompt(rewards, num)
    images = run.model.decode(finals[best]).clamp(0, 1)
    return run.result("guidance", finals[best], images, rewards[best], num_samples=n, scale=config.scale)
