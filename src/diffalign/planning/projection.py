"""Project what an alignment run will cost before running it: `project`.

From a measured `StepCost` (or per-step figures given by hand) and the run's shape:

    wall on one device     = fixed + steps * seconds_per_step
    wall on N > 1 devices  = fixed + steps * seconds_per_step / (N * efficiency)      (data parallel:
                             the same global batch split over N devices, `efficiency` <= 1 for the
                             gradient all-reduce and stragglers; an assumption, shown in the output)
    device-hours           = N * wall on N devices / 3600
    compute cost           = device-hours * price per device-hour
    annotation cost        = preference pairs * labels per pair * price per label
    NFEs, reward queries   = per step * steps

Peak memory is the measured peak of one process; data parallelism does not lower it (each device holds
the model and its micro-batch), which the assumptions say.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from diffalign.planning.measure import StepCost


@dataclass
class RunShape:
    """The run to project.

    Attributes:
        steps: optimiser steps (or epochs for policy-gradient RL) of the run.
        devices: devices (GPUs, or CPU processes) the run is spread over.
        efficiency: data-parallel scaling efficiency in (0, 1] (1: perfect).
        price_per_device_hour: what one device-hour costs (0: no compute cost).
        preference_pairs: pairs to be labelled for the run (DPO data, online rounds, a reward model).
        labels_per_pair: raters per pair.
        price_per_label: what one label costs.
    """

    steps: int
    devices: int = 1
    efficiency: float = 0.9
    price_per_device_hour: float = 0.0
    preference_pairs: int = 0
    labels_per_pair: int = 1
    price_per_label: float = 0.0

    def check(self) -> None:
        """Raise ValueError naming the first field that cannot be projected."""
        if self.steps < 1 or self.devices < 1:
            raise ValueError(f"plan: steps and devices must be >= 1, got {self.steps} and {self.devices}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"plan: efficiency must be in (0, 1], got {self.efficiency}")
        for name in ("price_per_device_hour", "preference_pairs", "labels_per_pair", "price_per_label"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"plan: {name} must be a number >= 0, got {getattr(self, name)}")


@dataclass
class Projection:
    """What the run is projected to cost (see the module doc), with the assumptions behind it."""

    wall_seconds_one_device: float
    wall_seconds: float
    device_hours: float
    compute_cost: float
    annotation_cost: float
    total_cost: float
    forward_nfe: float | None
    backward_nfe: float | None
    reward_queries: float | None
    peak_memory_mb: float | None
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _times(per_step: float | None, steps: int) -> float | None:
    return None if per_step is None else per_step * steps


def project(cost: StepCost, shape: RunShape) -> Projection:
    """Project `shape` from the per-step `cost`."""
    shape.check()
    steps_time = shape.steps * cost.seconds_per_step
    one = cost.fixed_seconds + steps_time
    # the efficiency factor is the cost of spreading over devices: one device runs at its measured speed
    speed_up = shape.devices * shape.efficiency if shape.devices > 1 else 1.0
    wall = cost.fixed_seconds + steps_time / speed_up
    device_hours = shape.devices * wall / 3600
    compute = device_hours * shape.price_per_device_hour
    annotation = shape.preference_pairs * shape.labels_per_pair * shape.price_per_label
    queries = _times(cost.reward_queries_per_step, shape.steps)
    source = (
        cost.source
        if cost.source is not None
        else "given by hand"
        if cost.steps_measured is None
        else f"measured on {cost.device} (runs of {cost.steps_measured[0]} and "
        f"{cost.steps_measured[1]} {cost.unit}s)"
    )
    assumptions = [
        f"{cost.seconds_per_step:.3g} s per {cost.unit} and {cost.fixed_seconds:.3g} s fixed, {source}; "
        "checkpoints and log lines of a longer run add in proportion to their number"
    ]
    if shape.devices > 1:
        assumptions.append(
            f"{shape.devices} devices data-parallel with the same global batch at {shape.efficiency:.0%} "
            "scaling efficiency; the fixed part does not shrink; peak memory is per device and does not "
            "shrink"
        )
    figures = {"wall time": one, "device-hours": device_hours, "compute cost": compute}
    figures |= {"annotation cost": annotation, "total cost": compute + annotation}
    overflowing = [name for name, value in figures.items() if not math.isfinite(value)]
    if overflowing:
        raise ValueError(
            f"plan: the projection overflows ({', '.join(overflowing)}); check the figures given"
        )
    if queries is None:
        assumptions.append("reward queries not counted (a preference-pair trainer, or figures given by hand)")
    return Projection(
        wall_seconds_one_device=one,
        wall_seconds=wall,
        device_hours=device_hours,
        compute_cost=compute,
        annotation_cost=annotation,
        total_cost=compute + annotation,
        forward_nfe=_times(cost.forward_nfe_per_step, shape.steps),
        backward_nfe=_times(cost.backward_nfe_per_step, shape.steps),
        reward_queries=queries,
        peak_memory_mb=cost.peak_memory_mb,
        assumptions=assumptions,
    )
