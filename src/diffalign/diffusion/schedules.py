"""Noise schedules and the conversions between a network's output, x0 and the noise.

Two families, matching the time convention of `diffalign.diffusion.protocol`:

- `DDPMSchedule`: the discrete variance-preserving schedule of DDPM (Ho et al. 2020, eq. 4),
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with t an integer-valued training timestep in
  [0, num_train_timesteps). The clean end of a sampling chain is t = -1 with abar = 1 (diffusers'
  `set_alpha_to_one`).
- `FlowSchedule`: rectified flow (Liu et al. 2022; Esser et al. 2024, "SD3"),
  x_t = (1 - t) x0 + t eps with t in [0, 1] and velocity v = eps - x0.

Timesteps travel as float tensors (a float32 tensor holding integers for DDPM, the noise level for
flows), either one value for the whole batch (0-d) or one per sample ([B]); `broadcast_time` shapes
them against a [B, C, H, W] batch. Schedule coefficients are kept in float64 and every computation
here runs in float32 or wider (`compute_dtype`), whatever the dtype of the latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffalign.diffusion.protocol import PREDICTION_TYPES

BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS: tuple[str, ...] = ("trailing", "leading")
FLOW_TIME_DISTRIBUTIONS: tuple[str, ...] = ("logit_normal", "uniform")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype schedule arithmetic runs in: float32, or float64 if any input is float64."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def broadcast_time(values: Tensor | float, x: Tensor) -> Tensor:
    """Shape per-sample values [B] (or a scalar) so that they broadcast over a batch `x` [B, ...].

    A 0-d tensor or a Python number is returned as a 0-d tensor on `x`'s device; a 1-D tensor must
    have one value per sample and is viewed as [B, 1, ..., 1].
    """
    values = torch.as_tensor(values, device=x.device)
    if values.ndim == 0:
        return values
    if values.ndim == 1 and values.shape[0] == x.shape[0]:
        return values.view(-1, *([1] * (x.ndim - 1)))
    raise ValueError(
        f"time values must be a scalar or have one entry per sample ({x.shape[0]}), got shape "
        f"{tuple(values.shape)}"
    )


def _betas(schedule: str, start: float, end: float, steps: int) -> Tensor:
    """diffusers' DDPMScheduler beta schedules, evaluated in float64."""
    if schedule == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2

    # squaredcos_cap_v2: the cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas capped at 0.999
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)]
    return torch.tensor(betas, dtype=torch.float64)


@dataclass
class DDPMSchedule:
    """The discrete DDPM noise schedule (Ho et al. 2020), as diffusers' `DDPMScheduler` defines it.

    Attributes:
        num_train_timesteps: number of discrete training timesteps T; t runs over 0..T-1.
        beta_start: beta of the first timestep.
        beta_end: beta of the last timestep.
        beta_schedule: "linear" (DDPM), "scaled_linear" (Stable Diffusion: linear in sqrt(beta)) or
            "squaredcos_cap_v2" (the cosine schedule of Nichol & Dhariwal 2021; ignores start/end).
        steps_offset: added to "leading" timesteps (diffusers' `steps_offset`; Stable Diffusion 1.x
            configs use 1). "trailing" spacing ignores it.
        alphas_cumprod: abar_t for t = 0..T-1, float64 (derived, not an argument).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    steps_offset: int = 0
    alphas_cumprod: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        betas = _betas(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """abar_t (float64, on `t`'s device) for integer-valued timesteps; t = -1 gives 1 (clean end)."""
        t = torch.as_tensor(t)
        index = t.round().long() if t.is_floating_point() else t.long()
        if bool(((index < -1) | (index >= self.num_train_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.num_train_timesteps}), got {t}")
        table = self.alphas_cumprod.to(index.device)
        values = table[index.clamp(min=0)]
        return torch.where(index < 0, torch.ones_like(values), values)

    def timesteps(self, num_steps: int, spacing: str = "trailing") -> Tensor:
        """The sampling levels: num_steps + 1 descending float32 values, the last one -1 (clean end).

        "trailing" starts at T-1 (diffusers' trailing spacing; Lin et al. 2024, "Common Diffusion
        Noise Schedules and Sample Steps are Flawed"); "leading" is
        arange(num_steps) * (T // num_steps) + steps_offset, reversed.
        """
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
        index = torch.arange(num_steps, dtype=torch.float64)
        if spacing == "trailing":
            levels = torch.round(T - index * (T / num_steps)) - 1
        elif spacing == "leading":
            levels = (index * (T // num_steps)).flip(0) + self.steps_offset
            if levels[0] >= T:
                raise ValueError(f"steps_offset {self.steps_offset} pushes leading timesteps past {T - 1}")
        else:
            raise ValueError(f"spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
        return torch.cat([levels, levels.new_tensor([-1.0])]).to(torch.float32)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
        dtype = compute_dtype(x0, noise)
        abar = broadcast_time(self.alpha_bar(t.to(x0.device)), x0).to(dtype)
        return (abar.sqrt() * x0.to(dtype) + (1 - abar).sqrt() * noise.to(dtype)).to(x0.dtype)

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v-prediction target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, sec. 4)."""
        dtype = compute_dtype(x0, noise)
        abar = broadcast_time(self.alpha_bar(t.to(x0.device)), x0).to(dtype)
        return (abar.sqrt() * noise.to(dtype) - (1 - abar).sqrt() * x0.to(dtype)).to(x0.dtype)

    def sample_training_timesteps(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Uniform integer timesteps in [0, T) as a float32 tensor [batch] (Ho et al. 2020, alg. 1)."""
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=device).to(
            torch.float32
        )


@dataclass
class FlowSchedule:
    """Rectified-flow time levels x_t = (1 - t) x0 + t eps (Esser et al. 2024, "SD3").

    Attributes:
        shift: SD3's time shift t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024,
            resolution-dependent shifting), applied to sampling levels and to training times alike
            (as diffusers' SD3 scheduler does);
            1.0 leaves times unchanged, > 1 spends more time at high noise.
    """

    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    def shift_time(self, t: Tensor) -> Tensor:
        """t' = shift t / (1 + (shift - 1) t); keeps 0 and 1 fixed."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def timesteps(self, num_steps: int) -> Tensor:
        """num_steps + 1 shifted noise levels from 1.0 down to 0.0 (float32)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        levels = self.shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64))
        return levels.to(torch.float32)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t) x0 + t eps."""
        dtype = compute_dtype(x0, noise)
        tt = broadcast_time(t.to(x0.device), x0).to(dtype)
        return ((1 - tt) * x0.to(dtype) + tt * noise.to(dtype)).to(x0.dtype)

    def velocity(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The flow-matching target v = eps - x0 (Lipman et al. 2023; Liu et al. 2022), independent of t."""
        return noise - x0

    def sample_training_timesteps(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        distribution: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> Tensor:
        """Training times t [batch] (float32), shifted by `shift_time`.

        "logit_normal": t = sigmoid(n), n ~ N(logit_mean, logit_std^2) (Esser et al. 2024,
        logit-normal sampling);
        "uniform": t ~ U(0, 1).
        """
        if distribution == "logit_normal":
            n = torch.randn(batch, generator=generator, device=device)
            t = torch.sigmoid(logit_mean + logit_std * n)
        elif distribution == "uniform":
            t = torch.rand(batch, generator=generator, device=device)
        else:
            raise ValueError(f"distribution must be one of {FLOW_TIME_DISTRIBUTIONS}, got {distribution!r}")
        return self.shift_time(t).to(torch.float32)


def _check_family(prediction_type: str, schedule: DDPMSchedule | FlowSchedule | None) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if prediction_type != "flow" and not isinstance(schedule, DDPMSchedule):
        raise TypeError(
            f"prediction_type {prediction_type!r} needs a DDPMSchedule, got {type(schedule).__name__}"
        )


def predict_x0_and_eps(
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor | float,
    prediction_type: str,
    schedule: DDPMSchedule | FlowSchedule | None,
) -> tuple[Tensor, Tensor]:
    """Turn a raw network output into the predicted clean sample x0 and noise eps.

    - "epsilon": x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (Ho et al. 2020, eq. 15);
    - "v_prediction": x0 = sqrt(abar) x_t - sqrt(1 - abar) v, eps = sqrt(1 - abar) x_t + sqrt(abar) v
      (Salimans & Ho 2022, sec. 4);
    - "flow": x0 = x_t - t v, eps = x_t + (1 - t) v (from x_t = (1 - t) x0 + t eps, v = eps - x0).

    `t` is a scalar or per-sample [B] tensor; the results are in `compute_dtype` (float32 or wider).
    `schedule` may be None for flow models.
    """
    _check_family(prediction_type, schedule)
    dtype = compute_dtype(model_output, x_t)
    out, x = model_output.to(dtype), x_t.to(dtype)
    if prediction_type == "flow":
        tt = broadcast_time(torch.as_tensor(t, device=x.device), x).to(dtype)
        return x - tt * out, x + (1 - tt) * out
    assert isinstance(schedule, DDPMSchedule)
    abar = broadcast_time(schedule.alpha_bar(torch.as_tensor(t, device=x.device)), x)
    a, s = abar.sqrt().to(dtype), (1 - abar).sqrt().to(dtype)
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    return a * x - s * out, s * x + a * out


def training_target(
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    prediction_type: str,
    schedule: DDPMSchedule | FlowSchedule | None,
) -> Tensor:
    """The regression target of the denoising loss: eps, v (Salimans & Ho 2022) or eps - x0 (flow)."""
    _check_family(prediction_type, schedule)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "flow":
        return noise - x0
    assert isinstance(schedule, DDPMSchedule)
    return schedule.velocity(x0, noise, t)
