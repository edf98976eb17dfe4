"""The sampling loop: prompts -> a `Trajectory` holding every latent, the step log-probs and the images.

Time. A trajectory carries one shared vector `timesteps` [S+1] (CPU, float32) in the schedule's own
time: integer-valued DDPM timesteps ending with -1 (the clean end, abar = 1), or flow noise levels
from 1.0 to 0.0. Step i goes from timesteps[i] to timesteps[i+1]; the model sees timesteps[i]
expanded to one value per sample.

Reproducibility. Each sample owns a CPU `torch.Generator` seeded from its seed. It draws that sample's
initial noise first and then, for a stochastic sampler, one standard normal per step, always in this
order (also when `latents` overrides the initial noise: the initial draw is made and discarded, and
with an `sde_window`: the steps outside it draw their normal and do not use it), so a sample does not
depend on the batch it is drawn in, up to floating-point differences of batched kernels.

Guidance. Classifier-free guidance (Ho & Salimans 2022) runs the conditional and unconditional
halves in one forward pass on [cond; uncond] and combines the raw outputs linearly,
out = u + w (c - u), which is valid for noise, v and velocity predictions alike (each is affine in
the score at fixed x_t and t). With guidance_scale == 1 the unconditional half is skipped.

Gradients. `grad_steps` picks the steps that run with autograd: None (no step, nor the decode),
"all", or a collection of step indices (0 the noisiest; negative indices count from the end). Other
steps run under `torch.no_grad()`, so their outputs are detached and backpropagation is truncated
there, as AlignProp and DRaFT-K do. The decode keeps gradients iff the last step did. Stored latents,
log-probs and x0 predictions are always detached; the images carry the graph.

Callback. After every step, `callback(StepInfo)` runs in the caller's grad mode (outside the no_grad
of non-gradient steps). It may return None (keep the step's sample) or a tensor shaped like x_t that
replaces x_prev: the replacement is what the next step starts from and what the trajectory stores,
and its log-prob under the step's Gaussian is stored in place of the draw's, so `recompute_step`
still reproduces the stored log-probs. A steered trajectory is, however, not an on-policy sample.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from diffalign.diffusion.protocol import Conditioning, DiffusionModel
from diffalign.diffusion.schedules import TIMESTEP_SPACINGS, DDPMSchedule, FlowSchedule, compute_dtype
from diffalign.diffusion.steps import (
    StepOutput,
    ddim_step,
    ddpm_step,
    flow_euler_step,
    flow_sde_step,
    step_log_prob,
)

SAMPLERS: tuple[str, ...] = ("ddim", "ddpm", "flow_euler", "flow_sde")
FLOW_SAMPLERS: tuple[str, ...] = ("flow_euler", "flow_sde")
DDPM_SAMPLERS: tuple[str, ...] = ("ddim", "ddpm")


def check_sde_window(window: Sequence[int], num_steps: int, name: str) -> tuple[int, int]:
    """`window` as a (start, end) pair with 0 <= start < end <= num_steps (ValueError naming `name`)."""
    try:
        start, end = (int(v) for v in window)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be two step indices (start, end), got {window!r}") from err
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"{name} ({start}, {end}) must satisfy 0 <= start < end <= num_steps = {num_steps}")
    return start, end


@dataclass
class SamplerConfig:
    """How to sample.

    Attributes:
        sampler: "ddim" or "ddpm" for epsilon and v_prediction models; "flow_euler" (the ODE) or
            "flow_sde" (Flow-GRPO's SDE) for flow models.
        num_steps: number of denoising steps S.
        eta: DDIM's stochasticity (Song et al. 2021, eq. 16): 0 deterministic, 1 the DDPM posterior
            variance. Used by "ddim" only.
        noise_level: the SDE's a in sigma_t = a sqrt(t / (1 - t)) (Flow-GRPO uses 0.7). Used by
            "flow_sde" only.
        guidance_scale: classifier-free guidance weight w; 1 means no guidance (and no
            unconditional forward pass).
        timestep_spacing: "trailing" or "leading" placement of DDPM timesteps (see
            `DDPMSchedule.timesteps`); flow samplers ignore it.
        sde_window: (start, end): only steps start .. end - 1 (0 the noisiest) are the sampler's
            stochastic steps; the others are its deterministic twin (`step_config`: DDIM with eta 0
            for "ddim" and "ddpm", the flow ODE for "flow_sde"). None: every step is the sampler's
            own. Mixing ODE and SDE steps this way is MixGRPO's (Li et al. 2025) and Flow-GRPO-Fast's:
            a policy gradient then explores and trains on the window's steps only.
    """

    sampler: str = "ddim"
    num_steps: int = 20
    eta: float = 1.0
    noise_level: float = 0.7
    guidance_scale: float = 1.0
    timestep_spacing: str = "trailing"
    sde_window: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        for name in ("eta", "noise_level", "guidance_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}"
            )
        if self.sde_window is not None:
            self.sde_window = check_sde_window(self.sde_window, self.num_steps, "sde_window")
            if not self.stochastic:
                raise ValueError(
                    f"sde_window {list(self.sde_window)} needs a stochastic sampler; {self.sampler!r} with "
                    f"eta={self.eta}, noise_level={self.noise_level} is deterministic"
                )

    @classmethod
    def for_prediction_type(cls, prediction_type: str, **overrides: object) -> SamplerConfig:
        """A config whose default sampler suits the model family ("ddim" or "flow_sde")."""
        sampler = "flow_sde" if prediction_type == "flow" else "ddim"
        return cls(**{"sampler": sampler, **overrides})  # type: ignore[arg-type]

    @property
    def is_flow(self) -> bool:
        """Whether this sampler is for flow models."""
        return self.sampler in FLOW_SAMPLERS

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance is on (guidance_scale != 1)."""
        return self.guidance_scale != 1.0

    @property
    def stochastic(self) -> bool:
        """Whether steps draw noise (ddpm; ddim with eta > 0; flow_sde with noise_level > 0)."""
        return (
            self.sampler == "ddpm"
            or (self.sampler == "ddim" and self.eta > 0)
            or (self.sampler == "flow_sde" and self.noise_level > 0)
        )

    def step_config(self, step_index: int) -> SamplerConfig:
        """The sampler of step `step_index`: this one inside the SDE window (or without one), its
        deterministic twin outside (DDIM eta 0 for "ddim"/"ddpm", "flow_euler" for "flow_sde")."""
        window = self.sde_window
        if window is None or window[0] <= step_index < window[1]:
            return self
        if self.is_flow:
            return replace(self, sampler="flow_euler", sde_window=None)
        return replace(self, sampler="ddim", eta=0.0, sde_window=None)

    def check_prediction_type(self, prediction_type: str) -> None:
        """Raise ValueError if this sampler cannot sample a model with this prediction type."""
        if prediction_type == "flow" and not self.is_flow:
            raise ValueError(
                f"sampler {self.sampler!r} is for epsilon/v_prediction models; a flow model needs one of "
                f"{FLOW_SAMPLERS}"
            )
        if prediction_type in ("epsilon", "v_prediction") and self.is_flow:
            raise ValueError(
                f"sampler {self.sampler!r} is for flow models; a {prediction_type} model needs one of "
                f"{DDPM_SAMPLERS}"
            )
        if prediction_type not in ("epsilon", "v_prediction", "flow"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")

    def timesteps(self, schedule: DDPMSchedule | FlowSchedule) -> Tensor:
        """The S + 1 sampling levels of `schedule` for this config (CPU, float32)."""
        if isinstance(schedule, FlowSchedule):
            if not self.is_flow:
                raise ValueError(f"sampler {self.sampler!r} cannot use a FlowSchedule")
            return schedule.timesteps(self.num_steps)
        if self.is_flow:
            raise ValueError(f"sampler {self.sampler!r} needs a FlowSchedule, got {type(schedule).__name__}")
        return schedule.timesteps(self.num_steps, self.timestep_spacing)


@dataclass
class StepInfo:
    """What the sampling callback sees after each step.

    Attributes:
        step_index: i in 0..S-1 (0 is the noisiest step).
        num_steps: S.
        t: the step's starting level timesteps[i] (0-d float32 tensor, CPU).
        t_prev: its end level timesteps[i + 1].
        x_t: the batch the step started from [B, C, H, W].
        output: the step's `StepOutput` (prev, mean, std, x0_pred, log_prob), with gradients if the
            step ran with autograd.
        model_output: the guided raw model output at (x_t, t).
    """

    step_index: int
    num_steps: int
    t: Tensor
    t_prev: Tensor
    x_t: Tensor
    output: StepOutput
    model_output: Tensor


#: A sampling callback: returns None, or a tensor that replaces x_prev (see the module doc).
Callback = Callable[[StepInfo], "Tensor | None"]


@dataclass
class Trajectory:
    """A batch of sampling chains and everything needed to recompute their step log-probs.

    Attributes:
        prompts: the B prompts.
        seeds: the per-sample seeds, or None when the caller passed generators.
        latents: [B, S+1, C, H, W], x_T first and the final sample last (detached).
        log_probs: [B, S] float32 step log-probs (per dimension, see `steps`), 0 at
            deterministic steps; None when no step was stochastic.
        timesteps: [S+1] float32 (CPU) levels; step i goes from timesteps[i] to timesteps[i+1].
        stochastic: [S] bool, which steps had std > 0 (the ones a policy gradient can use).
        cond: the prompts' conditioning (B rows).
        uncond: the unconditional conditioning (B rows of the "" prompt), None without guidance.
        config: the `SamplerConfig` used.
        images: [B, 3, H, W] decoded final samples clamped to [0, 1] (with gradients iff the last step
            had them), or None when `decode=False`.
        x0_preds: [B, S, C, H, W] the model's x0 prediction at every step (detached), if kept.
        nfe: denoiser evaluations per sample (S, or 2S with guidance).
    """

    prompts: list[str]
    seeds: list[int] | None
    latents: Tensor
    log_probs: Tensor | None
    timesteps: Tensor
    stochastic: Tensor
    cond: Conditioning
    uncond: Conditioning | None
    config: SamplerConfig
    images: Tensor | None = None
    x0_preds: Tensor | None = None
    nfe: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        """S, the number of steps."""
        return int(self.timesteps.shape[0]) - 1

    @property
    def t(self) -> Tensor:
        """The starting level of every step [S]."""
        return self.timesteps[:-1]

    @property
    def t_prev(self) -> Tensor:
        """The end level of every step [S]."""
        return self.timesteps[1:]

    @property
    def final_latents(self) -> Tensor:
        """The final samples x_0 [B, C, H, W] (detached)."""
        return self.latents[:, -1]

    def select(self, indices: Sequence[int] | Tensor | slice) -> Trajectory:
        """The sub-trajectory of the samples at `indices` (in that order)."""
        if isinstance(indices, slice):
            indices = range(len(self))[indices]
        if not isinstance(indices, Tensor):
            indices = list(indices)
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        rows = index.tolist()

        def take(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[index.to(x.device)]

        return replace(
            self,
            prompts=[self.prompts[i] for i in rows],
            seeds=None if self.seeds is None else [self.seeds[i] for i in rows],
            latents=take(self.latents),
            log_probs=take(self.log_probs),
            cond=self.cond[index],
            uncond=None if self.uncond is None else self.uncond[index],
            images=take(self.images),
            x0_preds=take(self.x0_preds),
        )


def guided_predict(
    model: DiffusionModel,
    x_t: Tensor,
    t: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    *,
    use_reference: bool = False,
    checkpoint_model: bool = False,
) -> Tensor:
    """The (classifier-free guided) raw model output at (x_t, t) (Ho & Salimans 2022, eq. 6, their w + 1).

    With guidance, one forward pass on [cond; uncond] gives c and u and the result is u + w (c - u),
    computed in float32 or wider. `t` is a scalar or per-sample [B] tensor. `use_reference` calls
    `model.reference_predict` (the frozen base model); `checkpoint_model` wraps the model call in
    `torch.utils.checkpoint` (non-reentrant) to trade compute for activation memory.
    """
    batch = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(batch)
    predict = model.reference_predict if use_reference else model.predict
    guided = guidance_scale != 1.0
    if guided and uncond is None:
        raise ValueError(f"guidance_scale {guidance_scale} needs the unconditional conditioning")
    if guided:
        x_in, t_in, cond_in = torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([cond, uncond])
    else:
        x_in, t_in, cond_in = x_t, t, cond

    def call(x: Tensor, tt: Tensor) -> Tensor:
        return predict(x, tt, cond_in)

    out = checkpoint(call, x_in, t_in, use_reentrant=False) if checkpoint_model else call(x_in, t_in)
    if not guided:
        return out
    dtype = compute_dtype(out)
    c, u = out.to(dtype).chunk(2)
    return u + guidance_scale * (c - u)


def sampler_step(
    config: SamplerConfig,
    model: DiffusionModel,
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor,
    t_prev: Tensor,
    *,
    sigma_max: float | Tensor | None = None,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """Dispatch one step of `config.sampler` for `model` (its schedule and prediction type)."""
    if config.sampler == "ddim":
        return ddim_step(
            model_output,
            x_t,
            t,
            t_prev,
            schedule=model.schedule,
            prediction_type=model.prediction_type,
            eta=config.eta,
            noise=noise,
            prev_sample=prev_sample,
        )
    if config.sampler == "ddpm":
        return ddpm_step(
            model_output,
            x_t,
            t,
            t_prev,
            schedule=model.schedule,
            prediction_type=model.prediction_type,
            noise=noise,
            prev_sample=prev_sample,
        )
    if config.sampler == "flow_euler":
        return flow_euler_step(model_output, x_t, t, t_prev, prev_sample=prev_sample)
    return flow_sde_step(
        model_output,
        x_t,
        t,
        t_prev,
        noise_level=config.noise_level,
        sigma_max=sigma_max,
        noise=noise,
        prev_sample=prev_sample,
    )


def _generators(
    seeds: Sequence[int] | Sequence[torch.Generator] | None, batch: int
) -> tuple[list[torch.Generator], list[int] | None]:
    """One generator per sample, and the seeds when known (None -> seeds from torch's global RNG)."""
    if seeds is None:
        seeds = torch.randint(0, 2**31 - 1, (batch,)).tolist()
    seeds = list(seeds)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds/generators for {batch} prompts")
    if all(isinstance(s, torch.Generator) for s in seeds):
        return seeds, None  # type: ignore[return-value]
    if any(isinstance(s, torch.Generator) for s in seeds):
        raise TypeError("seeds must be all ints or all torch.Generator objects")
    ints = [int(s) for s in seeds]  # type: ignore[arg-type]
    return [torch.Generator().manual_seed(s) for s in ints], ints


def _draw(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One standard normal [C, H, W] per generator, stacked to [B, C, H, W] on `device` (float32)."""
    draws = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(draws).to(device)


def _grad_step_set(grad_steps: str | Collection[int] | None, num_steps: int) -> frozenset[int]:
    if grad_steps is None:
        return frozenset()
    if isinstance(grad_steps, str):
        if grad_steps != "all":
            raise ValueError(f"grad_steps must be None, 'all' or step indices, got {grad_steps!r}")
        return frozenset(range(num_steps))
    steps = set()
    for step in grad_steps:
        index = int(step)
        if not -num_steps <= index < num_steps:
            raise ValueError(f"grad step {index} is out of range for {num_steps} steps")
        steps.add(index % num_steps)
    return frozenset(steps)


def _grad_mode(enabled: bool) -> contextlib.AbstractContextManager:
    return torch.enable_grad() if enabled else torch.no_grad()


def sample(
    model: DiffusionModel,
    prompts: Sequence[str],
    *,
    config: SamplerConfig,
    seeds: Sequence[int] | Sequence[torch.Generator] | None = None,
    latents: Tensor | None = None,
    grad_steps: str | Collection[int] | None = None,
    checkpoint_grad_steps: bool = False,
    callback: Callback | None = None,
    keep_x0: bool = False,
    decode: bool = True,
) -> Trajectory:
    """Sample one image per prompt and record the whole trajectory (see the module doc).

    Args:
        model: any `DiffusionModel`.
        prompts: B prompts.
        config: the sampler; it must suit the model's prediction type.
        seeds: B integer seeds or B `torch.Generator`s (advanced in place); None draws seeds from
            torch's global RNG.
        latents: optional initial noise x_T [B, C, H, W] replacing the generators' first draw (it may
            require grad, e.g. for noise optimisation).
        grad_steps: None, "all", or the indices of the steps that run with autograd.
        checkpoint_grad_steps: wrap the model call of gradient steps in activation checkpointing.
        callback: called with a `StepInfo` after each step; may return a replacement for x_prev.
        keep_x0: also store every step's x0 prediction.
        decode: decode the final latents into images.
    """
    config.check_prediction_type(model.prediction_type)
    prompts = list(prompts)
    batch = len(prompts)
    if batch == 0:
        raise ValueError("sample needs at least one prompt")
    generators, seed_list = _generators(seeds, batch)
    device = model.device
    shape = tuple(int(d) for d in model.latent_shape)
    timesteps = config.timesteps(model.schedule)
    num_steps = config.num_steps
    grad_set = _grad_step_set(grad_steps, num_steps)
    sigma_max = float(timesteps[1]) if config.sampler == "flow_sde" else None

    with torch.no_grad():
        cond = model.encode_prompts(prompts).detach()
        uncond = model.encode_prompts([""] * batch).detach() if config.guided else None

    x = _draw(generators, shape, device)
    if latents is not None:
        if tuple(latents.shape) != (batch, *shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {(batch, *shape)}")
        x = latents.to(device)

    stored, log_probs, x0_preds, stochastic = [x.detach()], [], [], []
    for i in range(num_steps):
        t = timesteps[i].to(device).expand(batch)
        t_prev = timesteps[i + 1].to(device).expand(batch)
        noise = _draw(generators, shape, device) if config.stochastic else None
        with_grad = i in grad_set
        with _grad_mode(with_grad):
            model_output = guided_predict(
                model,
                x,
                t,
                cond,
                uncond,
                config.guidance_scale,
                checkpoint_model=with_grad and checkpoint_grad_steps,
            )
            out = sampler_step(
                config.step_config(i), model, model_output, x, t, t_prev, sigma_max=sigma_max, noise=noise
            )
        prev, log_prob = out.prev, out.log_prob
        if callback is not None:
            info = StepInfo(i, num_steps, timesteps[i], timesteps[i + 1], x, out, model_output)
            replacement = callback(info)
            if replacement is not None:
                if replacement.shape != prev.shape:
                    raise ValueError(
                        f"callback returned shape {tuple(replacement.shape)}, expected {tuple(prev.shape)}"
                    )
                prev = replacement
                if log_prob is not None:
                    with torch.no_grad():
                        log_prob = step_log_prob(prev, out.mean, out.std)
        stochastic.append(log_prob is not None)
        log_probs.append(
            torch.zeros(batch, dtype=torch.float32, device=device) if log_prob is None else log_prob.detach()
        )
        if keep_x0:
            x0_preds.append(out.x0_pred.detach())
        x = prev
        stored.append(x.detach())

    images = None
    if decode:
        with _grad_mode((num_steps - 1) in grad_set):
            images = model.decode(x).clamp(0, 1)

    return Trajectory(
        prompts=prompts,
        seeds=seed_list,
        latents=torch.stack(stored, dim=1),
        log_probs=torch.stack(log_probs, dim=1) if any(stochastic) else None,
        timesteps=timesteps,
        stochastic=torch.tensor(stochastic, dtype=torch.bool),
        cond=cond,
        uncond=uncond,
        config=config,
        images=images,
        x0_preds=torch.stack(x0_preds, dim=1) if keep_x0 else None,
        nfe=num_steps * (2 if config.guided else 1),
    )


def recompute_step(
    model: DiffusionModel,
    trajectory: Trajectory,
    step_index: int,
    sample_indices: Sequence[int] | Tensor | None = None,
    use_reference: bool = False,
) -> StepOutput:
    """Re-run step `step_index` of stored samples under the current (or reference) weights.

    The model (or `model.reference_predict` with `use_reference`) is evaluated on the stored x_t of
    `sample_indices` (default: all) with the stored conditioning and guidance, and the stored x_prev
    is scored under the step's Gaussian. The returned `log_prob` is what PPO/GRPO ratios need
    (exp(new - old) == 1 with unchanged weights); its `mean` and `std` give Flow-GRPO's KL
    |mu - mu_ref|^2 / (2 std^2). Gradients flow if the caller has them enabled.
    """
    num_steps = trajectory.num_steps
    if not -num_steps <= step_index < num_steps:
        raise ValueError(f"step_index {step_index} is out of range for {num_steps} steps")
    step_index %= num_steps
    config = trajectory.config
    config.check_prediction_type(model.prediction_type)
    if sample_indices is None:
        index = torch.arange(len(trajectory))
    else:
        index = torch.as_tensor(sample_indices, dtype=torch.long).reshape(-1)
    device = model.device
    latents = trajectory.latents
    rows = index.to(latents.device)
    x_t = latents[rows, step_index].to(device)
    prev = latents[rows, step_index + 1].to(device)
    count = int(index.shape[0])
    t = trajectory.timesteps[step_index].to(device).expand(count)
    t_prev = trajectory.timesteps[step_index + 1].to(device).expand(count)
    cond = trajectory.cond[index]
    uncond = None if trajectory.uncond is None else trajectory.uncond[index]
    model_output = guided_predict(
        model, x_t, t, cond, uncond, config.guidance_scale, use_reference=use_reference
    )
    sigma_max = float(trajectory.timesteps[1]) if config.sampler == "flow_sde" else None
    return sampler_step(
        config.step_config(step_index),
        model,
        model_output,
        x_t,
        t,
        t_prev,
        sigma_max=sigma_max,
        prev_sample=prev,
    )
