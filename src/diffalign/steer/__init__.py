"""Test-time alignment: steer a frozen diffusion model's sampler towards a reward.

Every method is written against `DiffusionModel` and the sampling loop's callback
(`diffalign.diffusion.sampling.sample`), so it runs on epsilon, v and flow models alike, and counts its
compute exactly (`budget`). One module per method:

- `bon`: best-of-N;                 - `search`: random and zero-order search over initial noises;
- `guidance`: reward-gradient guidance on the x0 prediction (DPS style);
- `fk`: Feynman-Kac steering (SMC);  - `svdd`: per-step selection among M candidates;
- `dno`: direct noise optimisation (gradient and zero-order).

`make_config(method, budget_nfe, sampler, **options)` sizes a method to a per-prompt NFE budget and
`run_method` runs it; `steered_sample_fn` turns a method into the sampler hook of a ShapesEval run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig
from diffalign.rewards.protocol import Reward
from diffalign.steer.bon import BestOfNConfig, best_of_n
from diffalign.steer.budget import BACKWARD_COST, CountingModel, CountingReward, Usage, plain_nfe
from diffalign.steer.common import SteerResult
from diffalign.steer.dno import DNOConfig, dno
from diffalign.steer.fk import FKConfig, fk_steering
from diffalign.steer.guidance import GuidanceConfig, reward_guidance
from diffalign.steer.search import SearchConfig, noise_search
from diffalign.steer.svdd import SVDDConfig, svdd

#: method name -> (config class, function(model, prompts, reward, sampler, config) -> SteerResult)
METHODS: dict[str, tuple[type, Callable[..., SteerResult]]] = {
    "bon": (BestOfNConfig, best_of_n),
    "search": (SearchConfig, noise_search),
    "guidance": (GuidanceConfig, reward_guidance),
    "fk": (FKConfig, fk_steering),
    "svdd": (SVDDConfig, svdd),
    "dno": (DNOConfig, dno),
}


#: method name -> the config field `make_config` sizes to the budget.
BUDGET_FIELDS: dict[str, str] = {
    "bon": "n",
    "search": "num_chains",
    "guidance": "num_samples",
    "fk": "num_particles",
    "svdd": "num_candidates",
    "dno": "iterations",
}


def make_config(method: str, budget_nfe: int | None, sampler: SamplerConfig, **options: object):
    """The config of `method` with `options`, sized to `budget_nfe` NFEs per prompt when given (the
    budget then sets `BUDGET_FIELDS[method]`, which `options` may not set as well)."""
    if method not in METHODS:
        raise ValueError(f"unknown steering method {method!r}; choose one of {sorted(METHODS)}")
    config_cls = METHODS[method][0]
    if budget_nfe is None:
        return config_cls(**options)
    sized = BUDGET_FIELDS[method]
    if sized in options:
        raise ValueError(
            f"{sized}={options[sized]!r} and budget_nfe={budget_nfe} both set {sized} ({method}'s budget "
            f"sizes it); give one or the other"
        )
    return config_cls.from_budget(budget_nfe, sampler, **options)


def run_method(
    method: str,
    model: DiffusionModel,
    prompts: Sequence[str],
    reward: Reward,
    sampler: SamplerConfig,
    config: object,
    prompt_seeds: Sequence[int] | None = None,
) -> SteerResult:
    """Run `method` with its `config` (from `make_config`). `prompt_seeds` (one per prompt) makes each
    prompt's result depend on its own seed only, not on the batch (`PromptRandomness`)."""
    if method not in METHODS:
        raise ValueError(f"unknown steering method {method!r}; choose one of {sorted(METHODS)}")
    config_cls, fn = METHODS[method]
    if not isinstance(config, config_cls):
        raise TypeError(f"method {method!r} needs a {config_cls.__name__}, got {type(config).__name__}")
    return fn(model, prompts, reward, sampler, config, prompt_seeds)


def steered_sample_fn(
    method: str, reward: Reward, budget_nfe: int | None, **options: object
) -> Callable[[DiffusionModel, list[str], list[int], SamplerConfig], Tensor]:
    """A sampler hook `(model, prompts, seeds, sampler) -> images` that steers each batch with `method`.

    Each image's seed is its prompt's own seed (`PromptRandomness`), so an image does not depend on the
    batch it is steered in, nor on the caller's batch size. A `seed` option is refused: the caller's
    seeds decide.
    """
    if "seed" in options:
        raise ValueError(
            "steered_sample_fn: the seed comes from each image's own seed (the evaluation's --seed), "
            "not from a 'seed' option"
        )

    def sample_fn(
        model: DiffusionModel, prompts: list[str], seeds: list[int], sampler: SamplerConfig
    ) -> Tensor:
        config = make_config(method, budget_nfe, sampler, **options)
        return run_method(method, model, prompts, reward, sampler, config, prompt_seeds=seeds).images

    return sample_fn


__all__ = [
    "BACKWARD_COST",
    "BUDGET_FIELDS",
    "METHODS",
    "BestOfNConfig",
    "CountingModel",
    "CountingReward",
    "DNOConfig",
    "FKConfig",
    "GuidanceConfig",
    "SVDDConfig",
    "SearchConfig",
    "SteerResult",
    "Usage",
    "best_of_n",
    "dno",
    "fk_steering",
    "make_config",
    "noise_search",
    "plain_nfe",
    "reward_guidance",
    "run_method",
    "steered_sample_fn",
    "svdd",
]
