"""How `diffalign plan --measure` runs each trainer for a few steps: `trainer_runner`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffalign.evaluate.costs import CostMeter
from diffalign.planning.measure import LENGTH_FIELDS
from diffalign.prefs.pairs import PreferencePairs
from diffalign.prefs.ratings import ImageRatings

PG_METHODS = ("ddpo", "dpok", "grpo")
NFT_METHODS = ("nft",)
BACKPROP_METHODS = ("alignprop", "draft", "draft-lv", "refl")
PAIR_METHODS = ("dpo", "kto")


def run_length(method: str, config: object) -> int:
    """The run length of `config` (its `steps`, or `epochs` for policy-gradient RL and DiffusionNFT)."""
    return int(getattr(config, LENGTH_FIELDS[method][0]))


def trainer_runner(
    method: str, config: object, pairs: PreferencePairs | ImageRatings | None = None
) -> Callable[[Path, int, CostMeter], None]:
    """`run(run_dir, stop_after, meter)` for `measure_step_cost`: the real trainer with `config`,
    stopped after `stop_after` steps; reward-based trainers get their reward counted by `meter`."""
    if method in PAIR_METHODS:
        if pairs is None:
            raise ValueError(f"plan: {method} needs preference pairs (--store) or, for kto, --ratings")
        from diffalign.align.dpo import train_dpo

        def run_pairs(run_dir: Path, stop_after: int, meter: CostMeter) -> None:
            train_dpo(config, pairs, run_dir, stop_after=stop_after)

        return run_pairs
    if method in PG_METHODS or method in NFT_METHODS or method in BACKPROP_METHODS:
        from diffalign.devices import resolve_device
        from diffalign.rewards.registry import load_reward

        if method in PG_METHODS:
            from diffalign.align.policy_gradient import train_pg as train
        elif method in NFT_METHODS:
            from diffalign.align.nft import train_nft as train
        else:
            from diffalign.align.reward_backprop import train_backprop as train
        reward = load_reward(config.reward, device=resolve_device(config.runtime.device))

        def run_reward(run_dir: Path, stop_after: int, meter: CostMeter) -> None:
            train(config, run_dir, stop_after=stop_after, reward=meter.count_reward(reward))

        return run_reward
    raise ValueError(f"plan: no trainer named {method!r}; choose one of {sorted(LENGTH_FIELDS)}")
