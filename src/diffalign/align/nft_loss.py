"""DiffusionNFT's objective (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward
Process", arXiv:2509.16117, eq. 6 and their adaptive weighting).

For a generated sample x0 with optimality probability r in [0, 1], a noise level t and fresh noise, the
forward process gives x_t; the current prediction v_theta and the old (sampling) policy's v_old define
two implicit policies

    v+ = beta v_theta + (1 - beta) v_old,        v- = (1 + beta) v_old - beta v_theta,

and the loss pulls v+ towards the sample when it was good and v- when it was bad:

    L = (r ||x0(v+) - x0||^2 / w+  +  (1 - r) ||x0(v-) - x0||^2 / w-) * adv_clip / beta,

with x0(.) the clean-sample prediction of a raw output at (x_t, t) (any parameterisation: it is linear
in the output), and w = mean |x0(.) - x0| per sample, detached (the adaptive weighting of the
reference code, which makes the loss scale-free across noise levels). At v_theta = v_old its gradient
is (2r - 1) adv_clip times that of the plain (adaptively weighted) denoising loss, whatever beta: an
advantage-weighted denoising step whose negative half is bounded, because both terms stay convex in
v_theta (their curvature is beta adv_clip; a smaller beta is a looser trust region).

r comes from group-standardised advantages A clipped to +-adv_clip: r = A / (2 adv_clip) + 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.diffusion.schedules import predict_x0_and_eps

#: The adaptive weight's floor (the reference code's clip).
WEIGHT_FLOOR = 1e-5


def optimality_probability(advantages: Tensor, adv_clip: float) -> Tensor:
    """r = clip(A, -adv_clip, adv_clip) / (2 adv_clip) + 1/2, in [0, 1]."""
    return advantages.clamp(-adv_clip, adv_clip) / (2 * adv_clip) + 0.5


@dataclass
class NFTLoss:
    """The batch loss and what is logged beside it.

    Attributes:
        loss: the scalar to minimise (mean over the batch).
        per_sample: [B] the loss of each point (detached).
        old_deviation: mean (v_theta - v_old)^2 over the batch (detached): how far training has moved
            from the sampling policy at these points.
    """

    loss: Tensor
    per_sample: Tensor
    old_deviation: Tensor


def _adaptive_mse(pred: Tensor, target: Tensor) -> Tensor:
    dims = tuple(range(1, pred.ndim))
    error = pred - target
    with torch.no_grad():
        weight = error.abs().double().mean(dims, keepdim=True).clamp(min=WEIGHT_FLOOR).to(error.dtype)
    return (error**2 / weight).mean(dims)


def nft_loss(
    new_output: Tensor,
    old_output: Tensor,
    x_t: Tensor,
    t: Tensor,
    x0: Tensor,
    reward_prob: Tensor,
    *,
    beta: float,
    adv_clip: float,
    prediction_type: str,
    schedule,
) -> NFTLoss:
    """DiffusionNFT's loss (module doc) for raw model outputs at (x_t, t) of the samples x0.

    Args:
        new_output: [B, C, H, W] the policy's raw output (with gradients).
        old_output: [B, C, H, W] the old policy's raw output (no gradients needed; detached here).
        x_t: [B, C, H, W] the forward-noised samples.
        t: [B] their noise levels (DDPM timesteps or flow times).
        x0: [B, C, H, W] the samples.
        reward_prob: [B] optimality probabilities r in [0, 1] (`optimality_probability`).
        beta, adv_clip: as in `NFTConfig`.
        prediction_type, schedule: the model's, to map outputs to x0 predictions.
    """
    old_output = old_output.detach()
    positive = beta * new_output + (1 - beta) * old_output
    negative = (1 + beta) * old_output - beta * new_output
    x0_pos = predict_x0_and_eps(positive, x_t, t, prediction_type, schedule)[0]
    x0_neg = predict_x0_and_eps(negative, x_t, t, prediction_type, schedule)[0]
    target = x0.to(x0_pos.dtype)
    r = reward_prob.to(x0_pos.dtype)
    per_sample = (r * _adaptive_mse(x0_pos, target) + (1 - r) * _adaptive_mse(x0_neg, target)) * (
        adv_clip / beta
    )
    deviation = ((new_output.detach().float() - old_output.float()) ** 2).mean()
    return NFTLoss(per_sample.mean(), per_sample.detach(), deviation)
