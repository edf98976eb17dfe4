"""Diversity of a sample set: mean pairwise distance in a feature space.

- `mean_pairwise_distance(features)`: the mean Euclidean distance over all unordered pairs of rows
  (the whole set: does the model still cover many prompts' worth of content?).
- `per_prompt_variety(features, prompts)`: for each prompt with at least two samples, the mean pairwise
  distance among its samples, then the mean over those prompts (NaN when none has two): does one
  prompt still give varied images, or has the model collapsed onto one layout/colour (mode collapse
  is the usual cost of reward optimisation)?
- Feature spaces: `pixel_features` (flattened pixels scaled by 1/sqrt(D), so the distance is the RMS
  pixel difference, in [0, 1] for images in [0, 1]) and the learned Shapes features
  (`diffalign.evaluate.features.extract_features`), where a distance reflects content rather than
  pixel placement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def pixel_features(images: Tensor) -> Tensor:
    """[B, 3, H, W] float in [0, 1] (or uint8 in [0, 255], scaled to [0, 1]) -> [B, D] float64 pixels /
    sqrt(D) (Euclidean distance = RMS distance)."""
    if images.ndim != 4:
        raise ValueError(f"pixel_features needs [B, C, H, W] images, got {tuple(images.shape)}")
    flat = images.detach().double().reshape(images.shape[0], -1)
    if images.dtype == torch.uint8:
        flat = flat / 255.0
    return flat / math.sqrt(flat.shape[1])


def mean_pairwise_distance(features: Tensor) -> float:
    """Mean Euclidean distance over the n (n - 1) / 2 pairs of rows of `features` [n, D] (n >= 2)."""
    if features.ndim != 2:
        raise ValueError(f"mean_pairwise_distance needs [n, D] features, got {tuple(features.shape)}")
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"mean_pairwise_distance needs at least two rows, got {n}")
    x = features.detach().double()
    d = torch.cdist(x, x)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=1)
    return float(d[upper].mean())


def per_prompt_variety(features: Tensor, prompts: Sequence[str]) -> float:
    """Mean over prompts with >= 2 samples of their samples' mean pairwise distance (NaN if none)."""
    if features.ndim != 2 or features.shape[0] != len(prompts):
        raise ValueError(f"per_prompt_variety: {len(prompts)} prompts for features {tuple(features.shape)}")
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    values = [mean_pairwise_distance(features[rows]) for rows in groups.values() if len(rows) >= 2]
    return float(sum(values) / len(values)) if values else float("nan")
