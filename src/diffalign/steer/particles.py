"""Particle-population maths for sequential Monte Carlo: normalised weights, ESS and resampling.

Populations are prompt-major: B prompts with K particles each, stored as [B, K] log-weights; particle
k of prompt b is row b * K + k of the latent batch. Resampling only ever mixes a prompt's own particles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffalign.steer.common import PromptRandomness


def normalized_weights(log_weights: Tensor) -> Tensor:
    """Self-normalised weights softmax(log w) along the particle axis (last), computed stably."""
    return torch.softmax(log_weights.double(), dim=-1)


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """Kish's effective sample size 1 / sum_k w_k^2 of the normalised weights, per population [B].

    It is K for equal weights and 1 when one particle holds all the weight.
    """
    w = normalized_weights(log_weights)
    return 1.0 / (w**2).sum(dim=-1)


def multinomial_ancestors(
    log_weights: Tensor, generator: torch.Generator | PromptRandomness | None = None
) -> Tensor:
    """K ancestors per population drawn with replacement in proportion to the weights [B, K] (multinomial
    resampling, as the FK-steering reference does); the particle count is kept. `generator` may be a
    `PromptRandomness`, which draws each population from its own prompt's generator."""
    w = normalized_weights(log_weights).float().cpu()
    count = w.shape[-1]
    if generator is not None and not isinstance(generator, torch.Generator):
        return generator.multinomial(w, count, replacement=True).to(log_weights.device)
    return torch.multinomial(w, count, replacement=True, generator=generator).to(log_weights.device)


def flat_indices(ancestors: Tensor) -> Tensor:
    """Turn per-population ancestor indices [B, K] into row indices of the prompt-major batch [B * K]."""
    batch, count = ancestors.shape
    offsets = torch.arange(batch, device=ancestors.device)[:, None] * count
    return (ancestors + offsets).reshape(-1)
