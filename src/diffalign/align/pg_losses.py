"""Losses of policy-gradient fine-tuning, as small pure functions of per-sample tensors.

Log-probs follow `diffalign.diffusion.steps`: Gaussian log-densities averaged over the C*H*W
dimensions (per dimension), so the importance ratio exp(new - old) is the per-dimension ratio that
DDPO's and Flow-GRPO's clip ranges are calibrated for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PPOLoss:
    """The clipped surrogate of one batch of (sample, step) pairs.

    Attributes:
        loss: scalar, mean over pairs of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)).
        ratio: [N] rho = exp(logp_new - logp_old) (detached).
        approx_kl: scalar, 0.5 mean (logp_new - logp_old)^2 (ddpo-pytorch's estimate of KL(old || new)).
        clip_fraction: scalar, the fraction of pairs with |rho - 1| > eps.
    """

    loss: Tensor
    ratio: Tensor
    approx_kl: Tensor
    clip_fraction: Tensor


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> PPOLoss:
    """PPO's clipped objective as DDPO uses it (Black et al. 2023, eq. 6; Schulman et al. 2017, eq. 7).

    L = mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))), rho = exp(logp - logp_old). All inputs are
    per-pair [N]; `log_prob` carries the gradient.
    """
    if not log_prob.shape == old_log_prob.shape == advantages.shape:
        raise ValueError(
            f"shapes differ: log_prob {tuple(log_prob.shape)}, old {tuple(old_log_prob.shape)}, "
            f"advantages {tuple(advantages.shape)}"
        )
    log_ratio = log_prob.float() - old_log_prob.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        approx_kl = 0.5 * (log_ratio**2).mean()
        clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
    return PPOLoss(loss, ratio.detach(), approx_kl, clip_fraction)


def gaussian_mean_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) per dimension, per sample [B]: |mean - ref|^2 / (2 std^2)
    averaged over the non-batch dimensions (Flow-GRPO's KL; DPOK's per-step KL for two Gaussian steps
    that share the variance). Multiply by C*H*W for nats. `std` is per sample [B] and must be > 0."""
    if not bool((std > 0).all()):
        raise ValueError("gaussian_mean_kl needs std > 0 (a stochastic step)")
    sq = (mean.float() - ref_mean.float()) ** 2
    return sq.flatten(1).mean(dim=1) / (2 * std.float() ** 2)
