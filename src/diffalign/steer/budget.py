"""Exact compute accounting for steering: denoiser calls (NFEs), backward passes and reward calls.

Methods are compared at equal compute, so every denoiser evaluation is counted where it happens: the
model is wrapped in `CountingModel`, whose `predict` adds one NFE per latent it evaluates. A
classifier-free-guided step evaluates two latents per sample (conditional and unconditional), so it
costs 2 NFEs, as `Trajectory.nfe` counts it. A backward pass through a denoiser output (reward
guidance, DNO) is counted by a gradient hook on that output, one per latent, in `grad_nfe`. The
reward is wrapped in `CountingReward`, which counts every image it scores.

Budgets are stated per prompt in forward-NFE equivalents: `cost = nfe + BACKWARD_COST * grad_nfe`,
with a backward pass valued at two forward passes (the usual rule of thumb for convolutional nets;
reward calls are not charged, their count is reported next to the cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffalign.diffusion.protocol import Conditioning, DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig
from diffalign.rewards.protocol import Reward

#: Forward-NFE equivalents charged for one backward pass through the denoiser.
BACKWARD_COST = 2


@dataclass
class Usage:
    """Compute used so far (totals over all prompts).

    Attributes:
        nfe: denoiser evaluations, one per latent (a guided step counts 2 per sample).
        grad_nfe: backward passes through a denoiser output, one per latent.
        reward_calls: images scored by the reward.
        reward_grads: backward passes through the reward, one per image.
    """

    nfe: int = 0
    grad_nfe: int = 0
    reward_calls: int = 0
    reward_grads: int = 0

    @property
    def cost(self) -> int:
        """Forward-NFE equivalents: nfe + BACKWARD_COST * grad_nfe."""
        return self.nfe + BACKWARD_COST * self.grad_nfe

    def per_prompt(self, num_prompts: int) -> dict[str, float]:
        """Every count divided by the number of prompts (what budgets are stated in)."""
        return {
            "nfe": self.nfe / num_prompts,
            "grad_nfe": self.grad_nfe / num_prompts,
            "cost": self.cost / num_prompts,
            "reward_calls": self.reward_calls / num_prompts,
            "reward_grads": self.reward_grads / num_prompts,
        }


class CountingModel:
    """A `DiffusionModel` that forwards everything to `model` and counts its denoiser calls in `usage`."""

    def __init__(self, model: DiffusionModel, usage: Usage) -> None:
        if isinstance(model, CountingModel):
            raise TypeError("CountingModel: the model is already counted")
        self.model = model
        self.usage = usage
        self.prediction_type = model.prediction_type
        self.latent_shape = tuple(model.latent_shape)

    @property
    def schedule(self):
        return self.model.schedule

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _count(self, out: Tensor, rows: int) -> Tensor:
        self.usage.nfe += rows
        if out.requires_grad:

            def on_backward(grad: Tensor) -> None:
                self.usage.grad_nfe += rows

            out.register_hook(on_backward)
        return out

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self._count(self.model.predict(x_t, t, cond), int(x_t.shape[0]))

    def reference_predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self._count(self.model.reference_predict(x_t, t, cond), int(x_t.shape[0]))

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        return self.model.encode_prompts(prompts)

    def encode(self, images: Tensor) -> Tensor:
        return self.model.encode(images)

    def decode(self, latents: Tensor) -> Tensor:
        return self.model.decode(latents)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    def save(self, directory: str) -> None:
        self.model.save(directory)


class CountingReward:
    """A `Reward` that forwards to `reward` and counts scored images (and backward passes) in `usage`."""

    def __init__(self, reward: Reward, usage: Usage) -> None:
        self.reward = reward
        self.usage = usage
        self.name = reward.name
        self.differentiable = bool(getattr(reward, "differentiable", False))

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        out = self.reward(images, list(prompts))
        rows = int(images.shape[0])
        self.usage.reward_calls += rows
        if isinstance(out, Tensor) and out.requires_grad:

            def on_backward(grad: Tensor) -> None:
                self.usage.reward_grads += rows

            out.register_hook(on_backward)
        return out


def plain_nfe(config: SamplerConfig) -> int:
    """NFEs of one plain sample under `config`: S steps, doubled by classifier-free guidance."""
    return config.num_steps * (2 if config.guided else 1)


def units(budget_nfe: int, unit_cost: int, what: str, minimum: int = 1) -> int:
    """How many units of `unit_cost` NFEs fit in `budget_nfe`; a clear error if fewer than `minimum`."""
    if budget_nfe <= 0:
        raise ValueError(f"budget_nfe must be positive, got {budget_nfe}")
    count = budget_nfe // unit_cost
    if count < minimum:
        raise ValueError(
            f"budget_nfe {budget_nfe} is too small for {what}: it needs at least {minimum * unit_cost} NFEs "
            f"per prompt ({minimum} x {unit_cost})"
        )
    return count
