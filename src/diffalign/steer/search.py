"""Search over initial noises with a deterministic sampler (Ma et al. 2025, "Inference-time scaling for
diffusion models beyond scaling denoising steps").

With a deterministic sampler (DDIM eta = 0, the flow ODE) the initial noise x_T fixes the sample, so
inference-time search is a search over x_T, with the reward as a black-box verifier:

- "random": draw N noises, keep the best (best-of-N on a deterministic sampler; it runs `best_of_n`);
- "zero_order": start from a pivot noise n and, each round, score `neighbors` points on the sphere of
  radius |n| around it, n' = |n| (lam u + sqrt(1 - lam^2) w) with u = n / |n| and w a random unit
  vector orthogonal to u (tt-scale-flux uses lam = 0.95 and 4 neighbours); the pivot moves to the best
  neighbour when that one beats it. The whole budget is used: after the pivot, the chains left are
  split into rounds of `neighbors`, the last round possibly smaller.

Cost per prompt: one plain chain per scored noise. The reward is never differentiated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig
from diffalign.rewards.protocol import Reward
from diffalign.steer.bon import BestOfNConfig, best_of_n
from diffalign.steer.budget import plain_nfe, units
from diffalign.steer.common import PromptRandomness, Session, SteerResult, initial_noise, sample_final, score

SEARCH_MODES = ("random", "zero_order")


@dataclass
class SearchConfig:
    """Noise search.

    Attributes:
        mode: "random" or "zero_order" (see the module doc).
        num_chains: noises scored per prompt (the pivot included), i.e. plain chains run.
        neighbors: neighbours per zero-order round.
        lam: weight of the pivot direction in a neighbour (0.95 in tt-scale-flux); 1 - lam^2 is the
            share of the new random direction.
        seed: prompt i's pivot (or its random noises) come from seeds `seed + i * num_chains + j`;
            the neighbour directions from a generator seeded with `seed + i`. With per-prompt seeds
            (`PromptRandomness`), from `prompt_seeds[i] * num_chains + j` and prompt i's generator.
        batch_size: latents sampled per model call.
    """

    mode: str = "zero_order"
    num_chains: int = 4
    neighbors: int = 4
    lam: float = 0.95
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {SEARCH_MODES}, got {self.mode!r}")
        if self.num_chains < 1 or self.neighbors < 1:
            raise ValueError(
                f"num_chains and neighbors must be >= 1, got {self.num_chains} and {self.neighbors}"
            )
        if not 0.0 <= self.lam < 1.0:
            raise ValueError(f"lam must be in [0, 1), got {self.lam}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def from_budget(cls, budget_nfe: int, sampler: SamplerConfig, **overrides) -> SearchConfig:
        """As many chains as fit in `budget_nfe` NFEs per prompt."""
        return cls(
            num_chains=units(budget_nfe, plain_nfe(sampler), "noise search (one plain chain)"), **overrides
        )


def sphere_neighbors(pivot: Tensor, count: int, lam: float, generator: torch.Generator) -> Tensor:
    """`count` points |n| (lam u + sqrt(1 - lam^2) w) on the sphere through `pivot` [C, H, W] (module doc)."""
    flat = pivot.flatten().double()
    radius = flat.norm()
    u = flat / radius
    w = torch.randn(count, flat.numel(), generator=generator, dtype=torch.float64).to(flat.device)
    w = w - (w @ u)[:, None] * u[None, :]  # orthogonal to u, so every neighbour has norm |n|
    w = w / w.norm(dim=1, keepdim=True)
    points = radius * (lam * u[None, :] + (1 - lam**2) ** 0.5 * w)
    return points.to(pivot.dtype).view(count, *pivot.shape)


def noise_search(
    model: DiffusionModel,
    prompts: Sequence[str],
    reward: Reward,
    sampler: SamplerConfig,
    config: SearchConfig,
    prompt_seeds: Sequence[int] | None = None,
) -> SteerResult:
    """Search initial noises for each prompt with the reward as verifier (module doc); `prompt_seeds`
    gives each prompt its own seed (`PromptRandomness`)."""
    if sampler.stochastic:
        raise ValueError(
            "noise search needs a deterministic sampler (ddim with eta=0 or flow_euler): with a stochastic "
            "one the initial noise does not fix the sample; use best-of-N or FK steering instead"
        )
    if config.mode == "random":
        bon = BestOfNConfig(n=config.num_chains, seed=config.seed, batch_size=config.batch_size)
        result = best_of_n(model, prompts, reward, sampler, bon, prompt_seeds)
        result.method = "search"
        result.info["mode"] = "random"
        return result

    run = Session(model, reward, prompts)
    num = len(run.prompts)
    rng = PromptRandomness(config.seed, num, prompt_seeds)
    seeds = rng.candidate_seeds(config.num_chains)[:: config.num_chains]
    pivots = initial_noise(run.model, seeds)
    pivot_latents = sample_final(
        run.model, run.prompts, seeds, sampler, latents=pivots, batch_size=config.batch_size
    )
    pivot_rewards = score(run.reward, run.model, pivot_latents, run.prompts)
    if rng.per_prompt:
        generators = [rng.generator(i) for i in range(num)]
    else:
        generators = [torch.Generator().manual_seed(config.seed + i) for i in range(num)]
    left, moves, rounds = config.num_chains - 1, 0, 0
    while left > 0:
        count = min(config.neighbors, left)
        left -= count
        rounds += 1
        noises = torch.cat(
            [sphere_neighbors(pivots[i], count, config.lam, generators[i]) for i in range(num)]
        )
        flat_prompts = [p for p in run.prompts for _ in range(count)]
        flat_seeds = [s for s in seeds for _ in range(count)]
        finals = sample_final(
            run.model, flat_prompts, flat_seeds, sampler, latents=noises, batch_size=config.batch_size
        )
        values = score(run.reward, run.model, finals, flat_prompts).view(num, count)
        best_value, best_j = values.max(dim=1)
        for i in range(num):
            if best_value[i] > pivot_rewards[i]:
                flat = i * count + int(best_j[i])
                pivots[i], pivot_latents[i], pivot_rewards[i] = noises[flat], finals[flat], best_value[i]
                moves += 1
    images = run.model.decode(pivot_latents).clamp(0, 1)
    return run.result(
        "search", pivot_latents, images, pivot_rewards, mode="zero_order", rounds=rounds, pivot_moves=moves
    )
