"""Confidence intervals by the bootstrap (Efron 1979), percentile method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _check_settings(n_boot: int, level: float, name: str) -> None:
    if n_boot < 1:
        raise ValueError(f"{name}: n_boot must be at least 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"{name}: level must lie strictly between 0 and 1, got {level}")


def _values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """`values` as a 1-d float64 array of finite numbers (a NaN or infinite value is refused)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name}: expected a flat sequence of values, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} needs at least one value")
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name}: {bad} of {x.size} values are NaN or infinite")
    return x


def _interval(means: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling values with replacement).

    Raises ValueError for no values, a NaN or infinite value, or settings out of range."""
    x = _values(values, "bootstrap_mean_ci")
    _check_settings(n_boot, level, "bootstrap_mean_ci")
    if np.ptp(x) == 0:  # resampled means of equal values can differ from them in the last bits
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return _interval(means, level)


def stratified_bootstrap_ci(
    groups: Mapping[str, Sequence[float]], n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Interval of the mean of the group means (GenEval's overall score), resampling within groups."""
    if not groups:
        raise ValueError("stratified_bootstrap_ci needs at least one group")
    _check_settings(n_boot, level, "stratified_bootstrap_ci")
    rng = np.random.default_rng(seed)
    arrays = [_values(values, f"stratified_bootstrap_ci, group {name!r}") for name, values in groups.items()]
    if all(np.ptp(x) == 0 for x in arrays):  # every group constant: the interval is the point
        point = float(np.mean([x[0] for x in arrays]))
        return point, point
    per_group = [x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1) for x in arrays]
    return _interval(np.mean(per_group, axis=0), level)
