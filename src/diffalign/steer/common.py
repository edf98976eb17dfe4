"""What every steering method shares: the result record, seeds, and scoring helpers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig
from diffalign.rewards.protocol import Reward
from diffalign.steer.budget import CountingModel, CountingReward, Usage


@dataclass
class SteerResult:
    """One steered sample per prompt.

    Attributes:
        method: the method's name ("bon", "search", "guidance", "fk", "svdd", "dno").
        prompts: the B prompts.
        latents: the chosen final latents [B, C, H, W] (detached).
        images: their decoded images [B, 3, H, W] in [0, 1] (detached).
        rewards: the steering reward of each chosen image [B] (the proxy the method maximised).
        usage: total compute (divide by B for per-prompt figures, see `Usage.per_prompt`).
        seconds: wall time of the method.
        info: method-specific details (particle counts, iterations, final weights, ...).
    """

    method: str
    prompts: list[str]
    latents: Tensor
    images: Tensor
    rewards: Tensor
    usage: Usage
    seconds: float
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """A JSON-ready summary: per-prompt compute, mean reward, wall time and `info`."""
        return {
            "method": self.method,
            "num_prompts": len(self.prompts),
            "per_prompt": self.usage.per_prompt(len(self.prompts)),
            "mean_reward": float(self.rewards.float().mean()),
            "seconds": self.seconds,
            "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool, list))},
        }


class Session:
    """The counted model and reward of one steering run, and its clock."""

    def __init__(self, model: DiffusionModel, reward: Reward, prompts: Sequence[str]) -> None:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("steering needs at least one prompt")
        self.usage = Usage()
        self.model = CountingModel(model, self.usage)
        self.reward = CountingReward(reward, self.usage)
        self.prompts = prompts
        self.start = time.perf_counter()

    def result(self, method: str, latents: Tensor, images: Tensor, rewards: Tensor, **info) -> SteerResult:
        return SteerResult(
            method=method,
            prompts=self.prompts,
            latents=latents.detach(),
            images=images.detach(),
            rewards=rewards.detach().float().cpu(),
            usage=self.usage,
            seconds=time.perf_counter() - self.start,
            info=info,
        )


def candidate_seeds(seed: int, num_prompts: int, per_prompt: int) -> list[int]:
    """Seeds of `per_prompt` candidates of each prompt, prompt-major: seed + i * per_prompt + j."""
    return [seed + i * per_prompt + j for i in range(num_prompts) for j in range(per_prompt)]


#: Added to a prompt's own seed to seed its generator of other draws, away from candidate seeds.
GENERATOR_OFFSET = 1 << 40


class PromptRandomness:
    """The seeds and random draws of one steering run over `num_prompts` prompts.

    Two modes:
    - batch seed (`prompt_seeds` None): candidate j of prompt i uses seed `seed + i * per_prompt + j`
      (`candidate_seeds`) and every other draw (resampling, extra children, search directions) comes
      from one generator seeded with `seed`, shared by the batch. A prompt's result then depends on its
      position in the batch and on the other prompts.
    - per-prompt seeds: candidate j of prompt i uses seed `prompt_seeds[i] * per_prompt + j` and prompt
      i's other draws come from its own generator, seeded with `prompt_seeds[i] + GENERATOR_OFFSET`,
      so a prompt's result depends only on its own seed, whatever batch it is steered in (up to the
      floating-point differences of batched kernels). `diffalign eval --steer` uses this mode.
    """

    def __init__(self, seed: int, num_prompts: int, prompt_seeds: Sequence[int] | None = None) -> None:
        if prompt_seeds is not None:
            prompt_seeds = [int(s) for s in prompt_seeds]
            if len(prompt_seeds) != num_prompts:
                raise ValueError(f"prompt_seeds: {len(prompt_seeds)} seeds for {num_prompts} prompts")
            if len(set(prompt_seeds)) != num_prompts:
                raise ValueError("prompt_seeds: every prompt needs its own seed (duplicates given)")
            if min(prompt_seeds) < 0:
                raise ValueError("prompt_seeds must be >= 0")
        self.seed = int(seed)
        self.num_prompts = num_prompts
        self.prompt_seeds = prompt_seeds
        if prompt_seeds is None:
            self.generators = [torch.Generator().manual_seed(self.seed)]
        else:
            self.generators = [torch.Generator().manual_seed(s + GENERATOR_OFFSET) for s in prompt_seeds]

    @property
    def per_prompt(self) -> bool:
        """True when every prompt has its own seed and generator."""
        return self.prompt_seeds is not None

    def candidate_seeds(self, per_prompt: int) -> list[int]:
        """Seeds of `per_prompt` candidates of each prompt, prompt-major (see the class doc)."""
        if self.prompt_seeds is None:
            return candidate_seeds(self.seed, self.num_prompts, per_prompt)
        return [s * per_prompt + j for s in self.prompt_seeds for j in range(per_prompt)]

    def generator(self, prompt: int) -> torch.Generator:
        """The generator of prompt `prompt`'s draws (the shared one in batch-seed mode)."""
        return self.generators[prompt if self.per_prompt else 0]

    def normal(self, shape: Sequence[int], prompt_dim: int = 0, dtype: torch.dtype | None = None) -> Tensor:
        """Standard normals of `shape` (on the CPU) whose dimension `prompt_dim` has one entry per prompt;
        in per-prompt mode, each prompt's slice comes from its own generator."""
        shape = tuple(int(d) for d in shape)
        if shape[prompt_dim] != self.num_prompts:
            raise ValueError(f"normal: dimension {prompt_dim} of {shape} must be {self.num_prompts}")
        if not self.per_prompt:
            return torch.randn(shape, generator=self.generators[0], dtype=dtype)
        rest = shape[:prompt_dim] + shape[prompt_dim + 1 :]
        return torch.stack([torch.randn(rest, generator=g, dtype=dtype) for g in self.generators], prompt_dim)

    def multinomial(self, weights: Tensor, count: int, replacement: bool = False) -> Tensor:
        """`count` draws per prompt from the rows of `weights` [num_prompts, K] (on the CPU), as
        [num_prompts, count]."""
        if weights.shape[0] != self.num_prompts:
            raise ValueError(f"multinomial: {weights.shape[0]} rows for {self.num_prompts} prompts")
        if not self.per_prompt:
            return torch.multinomial(weights, count, replacement=replacement, generator=self.generators[0])
        draws = [
            torch.multinomial(row, count, replacement=replacement, generator=g)
            for row, g in zip(weights, self.generators, strict=True)
        ]
        return torch.stack(draws)


def initial_noise(model: DiffusionModel, seeds: Sequence[int]) -> Tensor:
    """The x_T that `sample` draws for these seeds (each seed's generator's first standard normal)."""
    shape = tuple(int(d) for d in model.latent_shape)
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(draws).to(model.device)


def score(reward: Reward, model: DiffusionModel, latents: Tensor, prompts: Sequence[str]) -> Tensor:
    """The reward of decoded `latents` (clamped to [0, 1] as `sample` does), without gradients."""
    with torch.no_grad():
        return reward(model.decode(latents).clamp(0, 1), list(prompts)).float()


def best_per_prompt(values: Tensor, num_prompts: int) -> Tensor:
    """Flat indices of the highest value within each prompt's block of a prompt-major [B * n] tensor."""
    per = values.shape[0] // num_prompts
    best = values.view(num_prompts, per).argmax(dim=1)
    return best + torch.arange(num_prompts, device=values.device) * per


def require_stochastic(config: SamplerConfig, method: str) -> None:
    """Refuse a deterministic sampler for a method that draws several children per step."""
    if not config.stochastic:
        raise ValueError(
            f"{method} needs a stochastic sampler (ddim with eta > 0, ddpm, or flow_sde), got "
            f"{config.sampler!r} with eta={config.eta}, noise_level={config.noise_level}"
        )


def sample_final(
    model: DiffusionModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: SamplerConfig,
    *,
    latents: Tensor | None = None,
    batch_size: int = 64,
) -> Tensor:
    """Plain sampling without gradients, `batch_size` at a time: the final latents [N, C, H, W]."""
    from diffalign.diffusion.sampling import sample

    prompts = list(prompts)
    finals = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        chunk_latents = None if latents is None else latents[start:stop]
        with torch.no_grad():
            traj = sample(
                model,
                prompts[start:stop],
                config=config,
                seeds=list(seeds[start:stop]),
                latents=chunk_latents,
                decode=False,
            )
        finals.append(traj.final_latents)
    return torch.cat(finals)
