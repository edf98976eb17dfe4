"""Pure sampler steps x_t -> x_prev that return the Gaussian they sample from and its log-density.

Every step maps (model_output, x_t, t, t_prev) to `StepOutput(prev, mean, std, x0_pred, log_prob)`.
`t` and `t_prev` are scalar or per-sample [B] tensors in the schedule's own time (see
`diffalign.diffusion.protocol`). Nothing here disables gradients: reward backpropagation
differentiates through the steps, so callers choose where `torch.no_grad()` applies.

Noise. A stochastic step (std > 0) needs either `noise` (a standard normal draw shaped like x_t; the
sampler draws it from per-sample generators) and returns prev = mean + std * noise, or `prev_sample`
(a stored x_prev), which it returns unchanged together with its log-density under the step's
Gaussian. The second form is how PPO/GRPO trainers recompute log-probs of stored trajectories under
new weights. A deterministic step (std == 0 for every sample) needs neither and returns
log_prob None.

Log-probs are computed in float32 (or float64 for float64 inputs) as the Normal log-density of prev
under (mean, std), AVERAGED over all non-batch dimensions (D = C*H*W): the log-density per
dimension, as DDPO and Flow-GRPO compute it. Why the mean and not the exact (summed) density:
- the summed log-density of one step is a sum of D terms, each amplifying a model-output difference
  delta by (x - mean) / std^2; with D = 3072 (a 32x32 image) or 16384 (an SD latent), the last
  float32 bit of the outputs, which changes with the batch a sample is computed in (kernels pick
  other algorithms for other batch sizes), moves the summed log-prob by ~1e-3, so exp(new - old)
  is not 1 when a stored trajectory is recomputed in another batch. Per dimension the same noise is
  ~1e-7, and the importance ratio is 1 within 1e-5 whatever the batch split;
- PPO clip ranges from the literature (DDPO's 1e-4) are calibrated for the per-dimension ratio: the
  summed ratio of a D-dimensional Gaussian step is so sensitive that a clip range would clip every
  sample after one update.
The exact log-density in nats (for KL estimates or likelihoods) is `log_prob * D`.
Samples whose std is 0 inside an otherwise stochastic batch contribute log-prob 0 (a point mass:
its ratio is always 1).

Precision: means and stds are computed in float32 or wider; `prev` and `x0_pred` are returned in
x_t's dtype, and log-probs are evaluated on the returned (possibly rounded) `prev`, so the log-prob
recorded while sampling equals the one recomputed from the stored latent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.diffusion.schedules import (
    DDPMSchedule,
    broadcast_time,
    compute_dtype,
    predict_x0_and_eps,
)

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    """The result of one sampler step.

    Attributes:
        prev: the sample at t_prev [B, C, H, W], in x_t's dtype.
        mean: the mean of the Gaussian x_prev | x_t (float32 or wider).
        std: its standard deviation per sample [B] (float32 or wider; 0 for a deterministic step).
        x0_pred: the model's prediction of the clean sample at t, in x_t's dtype.
        log_prob: float32 [B], log N(prev; mean, std^2) averaged over non-batch dimensions (see the
            module doc); None when the step is deterministic (std == 0 for every sample).
    """

    prev: Tensor
    mean: Tensor
    std: Tensor
    x0_pred: Tensor
    log_prob: Tensor | None


def _per_sample(std: Tensor, x: Tensor) -> Tensor:
    """View a per-sample [B] tensor as [B, 1, ..., 1] (scalars and broadcastable shapes pass through)."""
    if std.ndim == 1 and x.ndim > 1 and std.shape[0] == x.shape[0]:
        return std.view(-1, *([1] * (x.ndim - 1)))
    return std


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """log N(x; mean, std^2 I) averaged over all non-batch dimensions, as float32 [B].

    `std` is a scalar, a per-sample [B] tensor, or a tensor broadcastable to `x`. Computed in float32
    (float64 if an input is float64): -(x - mean)^2 / (2 std^2) - log std - log(2 pi) / 2 per element.
    """
    std = torch.as_tensor(std, device=x.device)
    dtype = compute_dtype(x, mean, std)
    std = _per_sample(std, x).to(dtype)
    diff = x.to(dtype) - mean.to(dtype)
    log_density = -(diff**2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    log_density = log_density.expand_as(diff)
    return log_density.flatten(1).mean(dim=1).to(torch.float32)


def step_log_prob(prev: Tensor, mean: Tensor, std: Tensor) -> Tensor | None:
    """The log-prob of `prev` under a step's Gaussian (see the module doc).

    None if every std is 0; samples with std 0 in a stochastic batch get 0.
    """
    positive = std > 0
    if not bool(positive.any()):
        return None
    if bool(positive.all()):
        return gaussian_log_prob(prev, mean, std)
    safe_std = torch.where(positive, std, torch.ones_like(std))
    log_prob = gaussian_log_prob(prev, mean, safe_std)
    return torch.where(positive.expand_as(log_prob), log_prob, torch.zeros_like(log_prob))


def _finish(
    mean: Tensor,
    std: Tensor,
    x0_pred: Tensor,
    x_t: Tensor,
    noise: Tensor | None,
    prev_sample: Tensor | None,
) -> StepOutput:
    """Draw (or take) prev from N(mean, std^2) and evaluate its log-prob."""
    std = std.expand(x_t.shape[0]) if std.ndim == 0 else std
    deterministic = not bool((std > 0).any())
    if prev_sample is not None:
        if prev_sample.shape != x_t.shape:
            raise ValueError(f"prev_sample has shape {tuple(prev_sample.shape)}, expected {tuple(x_t.shape)}")
        prev = prev_sample
    elif deterministic:
        prev = mean.to(x_t.dtype)
    else:
        if noise is None:
            raise ValueError(
                "this step is stochastic (std > 0): pass `noise` (a standard normal draw shaped like x_t) "
                "or `prev_sample` (a stored x_prev to evaluate)"
            )
        if noise.shape != x_t.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x_t.shape)}")
        prev = (mean + _per_sample(std, mean) * noise.to(mean.dtype)).to(x_t.dtype)
    log_prob = None if deterministic else step_log_prob(prev, mean, std)
    return StepOutput(prev=prev, mean=mean, std=std, x0_pred=x0_pred.to(x_t.dtype), log_prob=log_prob)


def _abar_pair(schedule: DDPMSchedule, t: Tensor, t_prev: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
    """abar_t and abar_prev as float64 per-sample [B] or 0-d tensors on x_t's device."""
    abar_t = schedule.alpha_bar(torch.as_tensor(t, device=x_t.device))
    abar_prev = schedule.alpha_bar(torch.as_tensor(t_prev, device=x_t.device))
    return abar_t, abar_prev


def ddim_step(
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor,
    t_prev: Tensor,
    *,
    schedule: DDPMSchedule,
    prediction_type: str,
    eta: float = 0.0,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """One DDIM step t -> t_prev (Song et al. 2021, eq. 12).

    mean = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps, with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (eq. 16);
    eta = 0 is the deterministic DDIM sampler, eta = 1 the DDPM posterior.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x0, eps = predict_x0_and_eps(model_output, x_t, t, prediction_type, schedule)
    dtype = x0.dtype
    abar_t, abar_prev = _abar_pair(schedule, t, t_prev, x_t)
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    sigma = eta * variance.clamp(min=0).sqrt()
    direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
    coef_x0 = broadcast_time(abar_prev.sqrt(), x0).to(dtype)
    mean = coef_x0 * x0 + broadcast_time(direction, eps).to(dtype) * eps
    return _finish(mean, sigma.to(dtype), x0, x_t, noise, prev_sample)


def ddpm_step(
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor,
    t_prev: Tensor,
    *,
    schedule: DDPMSchedule,
    prediction_type: str,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """One ancestral DDPM step: the posterior q(x_prev | x_t, x0 = x0_pred) (Ho et al. 2020, eqs. 6-7).

    For any (possibly skipping) pair t -> t_prev, with alpha = abar_t / abar_prev and beta = 1 - alpha:
    mean = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar_t) x_t,
    variance = (1 - abar_prev) / (1 - abar_t) beta. This equals DDIM with eta = 1.
    """
    x0, _ = predict_x0_and_eps(model_output, x_t, t, prediction_type, schedule)
    dtype = x0.dtype
    abar_t, abar_prev = _abar_pair(schedule, t, t_prev, x_t)
    alpha = abar_t / abar_prev
    beta = 1 - alpha
    coef_x0 = abar_prev.sqrt() * beta / (1 - abar_t)
    coef_xt = alpha.sqrt() * (1 - abar_prev) / (1 - abar_t)
    std = ((1 - abar_prev) / (1 - abar_t) * beta).clamp(min=0).sqrt()
    x = x_t.to(dtype)
    mean = broadcast_time(coef_x0, x).to(dtype) * x0 + broadcast_time(coef_xt, x).to(dtype) * x
    return _finish(mean, std.to(dtype), x0, x_t, noise, prev_sample)


def flow_euler_step(
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor,
    t_prev: Tensor,
    *,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """One Euler step of the rectified-flow ODE dx/dt = v: x_prev = x_t + (t_prev - t) v (Liu et al. 2022).

    Deterministic: std 0 and log_prob None; `noise` is ignored, `prev_sample` is returned if given.
    """
    dtype = compute_dtype(model_output, x_t)
    v, x = model_output.to(dtype), x_t.to(dtype)
    tt = torch.as_tensor(t, device=x.device)
    dt = torch.as_tensor(t_prev, device=x.device) - tt
    mean = x + broadcast_time(dt, x).to(dtype) * v
    x0 = x - broadcast_time(tt, x).to(dtype) * v
    std = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
    return _finish(mean, std, x0, x_t, None, prev_sample)


def flow_sde_step(
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor,
    t_prev: Tensor,
    *,
    noise_level: float = 0.7,
    sigma_max: float | Tensor | None = None,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """One Euler-Maruyama step of Flow-GRPO's reverse SDE (Liu et al. 2025, "Flow-GRPO", ODE-to-SDE).

    With dt = t_prev - t (< 0) and sigma_t = a sqrt(t / (1 - t)), a = `noise_level`:
    mean = x_t + [v + sigma_t^2 / (2 t) (x_t + (1 - t) v)] dt, std = sigma_t sqrt(-dt).
    At t == 1 the denominator 1 - t uses 1 - sigma_max instead (`sigma_max`: the schedule's second
    level, which the sampler passes), as the reference implementation does. sigma_t^2 / (2 t) is
    evaluated as a^2 / (2 (1 - t)), which is the same for t > 0.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    dtype = compute_dtype(model_output, x_t)
    v, x = model_output.to(dtype), x_t.to(dtype)
    tt = torch.as_tensor(t, device=x.device, dtype=torch.float64)
    dt = torch.as_tensor(t_prev, device=x.device, dtype=torch.float64) - tt
    at_one = tt >= 1
    if bool(at_one.any()):
        if sigma_max is None:
            raise ValueError("flow_sde_step at t == 1 needs sigma_max (the schedule's second level)")
        sigma_max = torch.as_tensor(sigma_max, device=x.device, dtype=torch.float64)
        if bool((sigma_max >= 1).any()):
            raise ValueError(f"sigma_max must be < 1, got {sigma_max}")
        denominator = torch.where(at_one, 1 - sigma_max, 1 - tt)
    else:
        denominator = 1 - tt
    sigma_t = noise_level * (tt / denominator).sqrt()
    drift_scale = noise_level**2 / (2 * denominator)  # = sigma_t^2 / (2 t)
    bt = broadcast_time
    score_term = bt(drift_scale, x).to(dtype) * (x + bt(1 - tt, x).to(dtype) * v)
    mean = x + (v + score_term) * bt(dt, x).to(dtype)
    std = (sigma_t * (-dt).clamp(min=0).sqrt()).to(dtype)
    x0 = x - bt(tt, x).to(dtype) * v
    return _finish(mean, std, x0, x_t, noise, prev_sample)
