"""Best-of-N: draw N samples per prompt with the plain sampler and keep the one the reward ranks first.

Cost per prompt: N plain chains (N * S NFEs, 2 N S with classifier-free guidance) and N reward calls.
The reward is a black box (never differentiated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig
from diffalign.rewards.protocol import Reward
from diffalign.steer.budget import plain_nfe, units
from diffalign.steer.common import (
    PromptRandomness,
    Session,
    SteerResult,
    best_per_prompt,
    sample_final,
    score,
)


@dataclass
class BestOfNConfig:
    """Best-of-N.

    Attributes:
        n: samples drawn per prompt.
        seed: candidate j of prompt i uses seed `seed + i * n + j`.
        batch_size: latents sampled per model call.
    """

    n: int = 4
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def from_budget(cls, budget_nfe: int, sampler: SamplerConfig, **overrides) -> BestOfNConfig:
        """The largest N whose chains fit in `budget_nfe` NFEs per prompt."""
        return cls(n=units(budget_nfe, plain_nfe(sampler), "best-of-N (one plain chain)"), **overrides)


def best_of_n(
    model: DiffusionModel,
    prompts: Sequence[str],
    reward: Reward,
    sampler: SamplerConfig,
    config: BestOfNConfig,
    prompt_seeds: Sequence[int] | None = None,
) -> SteerResult:
    """Sample `config.n` candidates per prompt and keep each prompt's highest-reward candidate;
    `prompt_seeds` gives each prompt its own seed (`PromptRandomness`)."""
    run = Session(model, reward, prompts)
    n = config.n
    flat_prompts = [p for p in run.prompts for _ in range(n)]
    latents = sample_final(
        run.model,
        flat_prompts,
        PromptRandomness(config.seed, len(run.prompts), prompt_seeds).candidate_seeds(n),
        sampler,
        batch_size=config.batch_size,
    )
    rewards = score(run.reward, run.model, latents, flat_prompts)
    best = best_per_prompt(rewards, len(run.prompts))
    chosen = latents[best]
    images = run.model.decode(chosen).clamp(0, 1)
    return run.result("bon", chosen, images, rewards[best], n=n, candidate_rewards=rewards.tolist())
