"""Confidence intervals by the bootstrap (Efron 1979), percentile method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling values with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_mean_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def stratified_bootstrap_ci(
    groups: Mapping[str, Sequence[float]], n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Interval of the mean of the group means (GenEval's overall score), resampling within groups."""
    if not groups:
        raise ValueError("stratified_bootstrap_ci needs at least one group")
    rng = np.random.default_rng(seed)
    per_group = []
    for values in groups.values():
        x = np.asarray(values, dtype=np.float64)
        if x.size == 0:
            raise ValueError("stratified_bootstrap_ci: a group is empty")
        per_group.append(x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1))
    overall = np.mean(per_group, axis=0)
    alpha = (1 - level) / 2
    return float(np.quantile(overall, alpha)), float(np.quantile(overall, 1 - alpha))
