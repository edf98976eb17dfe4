"""Measure what one step of a trainer costs on this machine: `measure_step_cost`.

The trainer itself runs, into a temporary run folder, twice: for `short` steps and for `long` steps
(`stop_after`), each under a `CostMeter`. The difference between the two runs is what `long - short`
steps cost, so the fixed part (loading the model and reward, starting Accelerate, the final checkpoint)
separates from the per-step part without touching the trainer:

    per_step = (W_long - W_short) / (long - short)        fixed = W_short - short * per_step

and the same for denoiser rows and reward queries. A step is an optimiser step (DPO, reward
backpropagation) or an epoch (policy-gradient RL and DiffusionNFT: sampling plus its updates), as each
trainer counts.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffalign.evaluate.costs import CostMeter, StageCost, denoiser_types

#: Trainers by method name: (config field holding the run length, unit of a step).
LENGTH_FIELDS = {
    "dpo": ("steps", "step"),
    "kto": ("steps", "step"),
    "ddpo": ("epochs", "epoch"),
    "dpok": ("epochs", "epoch"),
    "grpo": ("epochs", "epoch"),
    "nft": ("epochs", "epoch"),
    "alignprop": ("steps", "step"),
    "draft": ("steps", "step"),
    "draft-lv": ("steps", "step"),
    "refl": ("steps", "step"),
    "online-dpo": ("rounds", "round"),
    "spin": ("rounds", "round"),
}


@dataclass
class StepCost:
    """The measured cost of one step and of the fixed part of a run.

    Attributes:
        method: the trainer.
        unit: "step" or "epoch".
        seconds_per_step: wall seconds of one step.
        fixed_seconds: wall seconds a run spends outside its steps (start-up, final checkpoint).
        forward_nfe_per_step: denoiser rows evaluated per step (None when given by hand).
        backward_nfe_per_step: denoiser rows backpropagated per step (None when given by hand).
        reward_queries_per_step: images the reward scored per step (None when not counted).
        peak_memory_mb: the larger peak of the two measuring runs (None where not measurable).
        memory_kind: how memory was measured ("cuda", "cpu-rss" or "unavailable").
        device: where it ran (or "given" for figures given by hand).
        steps_measured: (short, long), or None for figures given by hand.
        source: how the figures were obtained, when neither measured by two runs of `unit`s nor
            given by hand (a round's cost composed from its parts' measurements).
    """

    method: str
    unit: str
    seconds_per_step: float
    fixed_seconds: float
    forward_nfe_per_step: float | None
    backward_nfe_per_step: float | None
    reward_queries_per_step: float | None
    peak_memory_mb: float | None
    memory_kind: str
    device: str
    steps_measured: tuple[int, int] | None
    source: str | None = None

    @classmethod
    def given(cls, method: str, seconds_per_step: float, fixed_seconds: float = 0.0) -> StepCost:
        """Per-step figures given by hand (e.g. from the GPU benchmark's table)."""
        if method not in LENGTH_FIELDS:
            raise ValueError(f"plan: no trainer named {method!r}; choose one of {sorted(LENGTH_FIELDS)}")
        finite = math.isfinite(seconds_per_step) and math.isfinite(fixed_seconds)
        if not finite or seconds_per_step <= 0 or fixed_seconds < 0:
            raise ValueError(
                f"plan: seconds per step must be a number > 0 and fixed seconds a number >= 0, got "
                f"{seconds_per_step}, "
                f"{fixed_seconds}"
            )
        return cls(
            method,
            LENGTH_FIELDS[method][1],
            seconds_per_step,
            fixed_seconds,
            None,
            None,
            None,
            None,
            "unavailable",
            "given",
            None,
        )


def _difference(short: StageCost, long: StageCost, steps: int, key: str) -> float | None:
    a, b = getattr(short, key), getattr(long, key)
    if a is None or b is None:
        return None
    return (b - a) / steps


def measure_step_cost(
    method: str,
    run: Callable[[Path, int, CostMeter], None],
    device: str,
    short: int = 1,
    long: int = 3,
    reward_counted: bool = False,
    unit: str | None = None,
) -> StepCost:
    """Measure `method` by calling `run(run_dir, stop_after, meter)` for `short`, then `long` steps.

    Args:
        method: the trainer's name (a key of `LENGTH_FIELDS`).
        run: runs the trainer into a fresh `run_dir`, stopping after `stop_after` steps; it may wrap its
            reward with `meter.count_reward` (then pass `reward_counted=True`).
        device: where it runs (CUDA memory is read there).
        short, long: the two run lengths (long > short >= 1).
        reward_counted: whether `run` counts reward queries into the meter (else they are None). The
            count includes the reward evaluations a trainer makes for its logs.
        unit: what `run` makes `stop_after` of, when not the trainer's step (e.g. "pair": a round's
            labelling, `planning.rounds`).
    """
    if method not in LENGTH_FIELDS:
        raise ValueError(f"plan: no trainer named {method!r}; choose one of {sorted(LENGTH_FIELDS)}")
    if not 1 <= short < long:
        raise ValueError(f"plan: the measuring runs need 1 <= short < long steps, got {short} and {long}")
    costs = []
    with tempfile.TemporaryDirectory(prefix="diffalign-plan-") as tmp:
        for i, steps in enumerate((short, long)):
            with CostMeter(denoiser_types(), device) as meter:
                run(Path(tmp) / f"run-{i}", steps, meter)
            costs.append(meter.cost)
    first, second = costs
    span = long - short
    per_step = (second.wall_s - first.wall_s) / span
    peaks = [c.peak_memory_mb for c in costs if c.peak_memory_mb is not None]
    queries = _difference(first, second, span, "reward_queries") if reward_counted else None
    return StepCost(
        method=method,
        unit=unit or LENGTH_FIELDS[method][1],
        seconds_per_step=max(per_step, 0.0),
        fixed_seconds=max(first.wall_s - short * per_step, 0.0),
        forward_nfe_per_step=(second.forward_nfe - first.forward_nfe) / span,
        backward_nfe_per_step=(second.backward_nfe - first.backward_nfe) / span,
        reward_queries_per_step=queries,
        peak_memory_mb=max(peaks) if peaks else None,
        memory_kind=second.memory_kind,
        device=str(device),
        steps_measured=(short, long),
    )
