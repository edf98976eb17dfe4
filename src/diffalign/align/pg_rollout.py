"""Rollouts of policy-gradient fine-tuning: an epoch's samples, their step log-probs, and the
(sample, step) pairs the policy is trained on.

An epoch's global set of samples is a function of (seed, epoch) only: its prompts, each sample's seed,
the epoch's SDE window (`epoch_sampler`), the shared initial noise of a group (`group_initial_noise`)
and, for every inner epoch, which steps of which samples are trained on in which order. Each process
samples a contiguous share of the rows and the shares are gathered, so every process holds the whole
epoch and takes its rows of every optimiser step by `runtime.global_batch_slice`. One process with
gradient accumulation k * P therefore computes the same updates as P processes with k.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from diffalign.align.prompts import PromptSource
from diffalign.align.runtime import step_generator
from diffalign.diffusion.protocol import Conditioning
from diffalign.diffusion.sampling import SamplerConfig, StepOutput, guided_predict, sample, sampler_step

#: Sub-streams of `step_generator(seed, epoch, stream=...)`.
PROMPT_STREAM = 1
WINDOW_STREAM = 2
PAIR_STREAM = 100  # + inner epoch


@dataclass
class Rollout:
    """One epoch's samples on every process (global, gathered).

    Attributes:
        prompts: the G prompts (groups of `samples_per_prompt` consecutive samples share one).
        latents: [G, S+1, C, H, W] every step's sample (x_T first).
        log_probs: [G, S] float32 step log-probs under the sampling policy (per dimension).
        timesteps: [S+1] the sampling levels (CPU).
        stochastic: [S] bool, the steps with a Gaussian (trainable) transition.
        images: [G, 3, H, W] the decoded samples in [0, 1].
        rewards: [G] float32.
    """

    prompts: list[str]
    latents: Tensor
    log_probs: Tensor
    timesteps: Tensor
    stochastic: Tensor
    images: Tensor
    rewards: Tensor

    def __len__(self) -> int:
        return len(self.prompts)


def epoch_prompts(source: PromptSource, seed: int, epoch: int, prompts_per_epoch: int, per_prompt: int):
    """(the epoch's G prompts, in groups of `per_prompt`, and one sampling seed per sample)."""
    gen = step_generator(seed, epoch, stream=PROMPT_STREAM)
    drawn = source.sample(prompts_per_epoch, gen)
    prompts = [p for p in drawn for _ in range(per_prompt)]
    seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=gen).tolist()
    return prompts, seeds


def epoch_sampler(
    sampler: SamplerConfig,
    window_size: int,
    window_range: tuple[int, int] | None,
    seed: int,
    epoch: int,
    *,
    schedule: str = "random",
    shift_every: int = 25,
    shift: int = 1,
    roll_back: bool = False,
) -> SamplerConfig:
    """The epoch's sampler: `sampler` itself with `window_size` 0, otherwise with an SDE window of
    `window_size` steps within `window_range` (default: every step that can be stochastic,
    `stochastic_range`). Where the window starts:
    - "random": drawn uniformly from the epoch's own stream (Flow-GRPO-Fast), so every process and a
      resumed run draw the same window;
    - "progressive": MixGRPO's sliding window: at the start of the range, moved `shift` steps later
      every `shift_every` epochs; at the end of the range it stays there, or with `roll_back` starts
      again at the beginning. (MixGRPO's scheduler lets the window shrink at the end of the chain;
      here it keeps its size.)"""
    if window_size == 0:
        return sampler
    low, high = window_range or stochastic_range(sampler)
    last = high - window_size  # the latest start that keeps the window inside the range
    if schedule == "progressive":
        offset = (epoch // shift_every) * shift
        if roll_back:
            offset %= (last - low) // shift * shift + shift
        start = min(low + offset, last)
    else:
        gen = step_generator(seed, epoch, stream=WINDOW_STREAM)
        start = low + int(torch.randint(last - low + 1, (1,), generator=gen))
    return replace(sampler, sde_window=(start, start + window_size))


def stochastic_range(sampler: SamplerConfig) -> tuple[int, int]:
    """The steps (start, end) a sampler can make stochastic: all of flow_sde's; all but the last of
    DDIM's and DDPM's, whose last step lands on abar = 1 and has no noise."""
    return (0, sampler.num_steps) if sampler.is_flow else (0, sampler.num_steps - 1)


def group_initial_noise(seeds: list[int], per_prompt: int, shape: tuple[int, ...]) -> Tensor:
    """x_T [G, *shape] where every sample of a group of `per_prompt` starts from the noise its group's
    first sample would draw (DanceGRPO's shared initial noise): the first normal of that seed's
    generator, exactly what `sample` draws for it."""
    firsts = [seeds[i - i % per_prompt] for i in range(len(seeds))]
    draws = {s: torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in set(firsts)}
    return torch.stack([draws[s] for s in firsts])


def sample_local(
    model,
    prompts: list[str],
    seeds: list[int],
    config: SamplerConfig,
    batch_size: int,
    initial_noise: Tensor | None = None,
):
    """Sample `prompts` in chunks of `batch_size`: (latents, log_probs, images, timesteps, stochastic).
    `initial_noise` [len(prompts), ...] replaces each sample's x_T (the step noise stays its seed's)."""
    latents, log_probs, images = [], [], []
    traj = None
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            x_T = None if initial_noise is None else initial_noise[chunk]
            traj = sample(model, prompts[chunk], config=config, seeds=seeds[chunk], latents=x_T)
            latents.append(traj.latents)
            log_probs.append(traj.log_probs)
            images.append(traj.images)
    if traj is None:
        raise ValueError("sample_local: no prompts")
    return torch.cat(latents), torch.cat(log_probs), torch.cat(images), traj.timesteps, traj.stochastic


def trained_steps_per_sample(sampler: SamplerConfig, window_size: int, fraction: float) -> int:
    """How many steps of each sample an inner epoch trains on (`training_pairs`), known before sampling:
    a `fraction` (at least one) of the stochastic steps, which are the SDE window's `window_size` steps
    or, without a window, every step the sampler can make stochastic (`stochastic_range`)."""
    low, high = stochastic_range(sampler)
    stochastic = window_size if window_size else high - low
    return max(1, round(fraction * stochastic))


def training_pairs(
    rollout: Rollout, fraction: float, seed: int, epoch: int, inner: int
) -> tuple[Tensor, Tensor]:
    """The inner epoch's (sample, step) pairs in training order: (sample indices [N], step indices [N]).

    Each sample trains on a random `fraction` of its stochastic steps (at least one), drawn per sample
    as DDPO does; all pairs are then shuffled together."""
    gen = step_generator(seed, epoch, stream=PAIR_STREAM + inner)
    steps = rollout.stochastic.nonzero().flatten()
    per_sample = max(1, round(fraction * len(steps)))
    rows, cols = [], []
    for i in range(len(rollout)):
        chosen = steps[torch.randperm(len(steps), generator=gen)[:per_sample]]
        rows.append(torch.full((per_sample,), i, dtype=torch.long))
        cols.append(chosen)
    rows_t, cols_t = torch.cat(rows), torch.cat(cols)
    order = torch.randperm(len(rows_t), generator=gen)
    return rows_t[order], cols_t[order]


class NetworkPolicy:
    """The model seen through a (possibly DDP-wrapped) network: `predict` runs `unet`, so gradients
    flow through the wrapper Accelerate prepared and are synchronised across processes. Everything
    else (schedule, prediction type, the frozen reference) is the model's."""

    def __init__(self, model, unet) -> None:
        self.model = model
        self.unet = unet
        self.prediction_type = model.prediction_type
        self.schedule = model.schedule

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.model.call_network(self.unet, x_t, t, cond)

    def reference_predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.model.reference_predict(x_t, t, cond)


def pair_steps(
    policy: NetworkPolicy,
    rollout: Rollout,
    config: SamplerConfig,
    rows: Tensor,
    cols: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    *,
    use_reference: bool = False,
) -> StepOutput:
    """Recompute the steps (rows[k], cols[k]) of the rollout under the policy (or the reference), the
    stored x_prev scored under each step's guided Gaussian: `recompute_step` batched over steps.

    `cond` holds one row per rollout sample; `uncond` one row per pair (or None without guidance)."""
    device = rollout.latents.device
    rows_d, cols_d = rows.to(device), cols.to(device)
    x_t = rollout.latents[rows_d, cols_d]
    prev = rollout.latents[rows_d, cols_d + 1]
    t = rollout.timesteps[cols].to(device)
    t_prev = rollout.timesteps[cols + 1].to(device)
    out = guided_predict(
        policy, x_t, t, cond[rows_d], uncond, config.guidance_scale, use_reference=use_reference
    )
    sigma_max = float(rollout.timesteps[1]) if config.sampler == "flow_sde" else None
    return sampler_step(config, policy, out, x_t, t, t_prev, sigma_max=sigma_max, prev_sample=prev)
