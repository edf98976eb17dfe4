"""Win rate of a model against a baseline on the same prompts and seeds, with a bootstrap CI over prompts.

Sample i of the model and sample i of the baseline share prompt i and seed i, so each pair differs only
by the model. A judge gives each pair a score in [0, 1] (the probability, or the indicator, that the
model's image wins):
- the gold rater panel (`RaterPanel.preference_prob`): the expected label of a random rater of the panel
  (or of one group), Bradley-Terry with ties counted 0.5;
- a reward model: 1 when the model's image gets the higher reward, 0 when lower, 0.5 on a tie
  (|difference| <= `tie_tolerance`).
The win rate is the mean score. Its interval is a percentile bootstrap over prompts
(`stats.bootstrap_mean_ci`) of the per-prompt mean score, so several samples of one prompt count as one
draw of the prompt distribution rather than as independent evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from diffalign.evaluate.stats import bootstrap_mean_ci
from diffalign.rewards.protocol import Reward
from diffalign.world.raters import RaterPanel


@dataclass
class WinRate:
    """A win rate and its interval.

    Attributes:
        win_rate: the mean pair score (0.5: no difference).
        ci95: the bootstrap interval [low, high] of the per-prompt mean score (level `level`).
        pairs: pairs judged.
        prompts: distinct prompts (the bootstrap's units).
        judge: "panel", "panel:<group>" or the reward's name.
        level: the interval's level.
    """

    win_rate: float
    ci95: tuple[float, float]
    pairs: int
    prompts: int
    judge: str
    level: float = 0.95

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        return out


def win_rate_from_scores(
    scores: Sequence[float] | np.ndarray | Tensor,
    prompts: Sequence[str],
    judge: str,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> WinRate:
    """Mean of the pair `scores` (each in [0, 1]) and the bootstrap interval over prompts."""
    if isinstance(scores, Tensor):
        scores = scores.detach().cpu().double().numpy()
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("win rate: no pairs to judge")
    if len(prompts) != x.size:
        raise ValueError(f"win rate: {x.size} scores but {len(prompts)} prompts")
    if np.isnan(x).any() or (x < 0).any() or (x > 1).any():
        raise ValueError("win rate: scores must lie in [0, 1]")
    groups: dict[str, list[float]] = {}
    for prompt, value in zip(prompts, x.tolist()):
        groups.setdefault(prompt, []).append(value)
    per_prompt = np.array([np.mean(v) for v in groups.values()])
    lo, hi = bootstrap_mean_ci(per_prompt, n_boot=n_boot, level=level, seed=seed)
    return WinRate(float(x.mean()), (lo, hi), int(x.size), len(groups), judge, level)


def reward_scores(reward_model: Tensor, reward_baseline: Tensor, tie_tolerance: float = 0.0) -> Tensor:
    """[B] 1 where the model's reward is higher, 0 where lower, 0.5 within `tie_tolerance`."""
    if reward_model.shape != reward_baseline.shape:
        shapes = f"{tuple(reward_model.shape)} and {tuple(reward_baseline.shape)}"
        raise ValueError(f"reward_scores: reward shapes {shapes} differ")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    for name, rewards in (("the model's", reward_model), ("the baseline's", reward_baseline)):
        bad = int((~torch.isfinite(rewards.detach())).sum())
        if bad:
            raise ValueError(
                f"reward_scores: {bad} of {rewards.numel()} of {name} rewards are NaN or infinite"
            )
    delta = reward_model.detach().double() - reward_baseline.detach().double()
    scores = (delta > 0).double()
    return torch.where(delta.abs() <= tie_tolerance, torch.full_like(scores, 0.5), scores)


@torch.no_grad()
def reward_win_rate(
    reward: Reward,
    images: Tensor,
    baseline_images: Tensor,
    prompts: Sequence[str],
    tie_tolerance: float = 0.0,
    name: str | None = None,
    **bootstrap: float,
) -> WinRate:
    """Win rate judged by `reward` (higher wins, ties 0.5); images [B, 3, H, W] in [0, 1]."""
    _check_pairs(images, baseline_images, prompts)
    prompts = list(prompts)
    scores = reward_scores(reward(images, prompts), reward(baseline_images, prompts), tie_tolerance)
    judge = name or getattr(reward, "name", type(reward).__name__)
    return win_rate_from_scores(scores, prompts, judge, **bootstrap)


@torch.no_grad()
def panel_win_rate(
    panel: RaterPanel,
    images: Tensor,
    baseline_images: Tensor,
    prompts: Sequence[str],
    group: str | None = None,
    **bootstrap: float,
) -> WinRate:
    """Win rate judged by the gold rater panel: the expected label of a random rater (of `group`)."""
    _check_pairs(images, baseline_images, prompts)
    probs = panel.preference_prob(images, baseline_images, list(prompts), group=group)
    return win_rate_from_scores(probs, prompts, "panel" if group is None else f"panel:{group}", **bootstrap)


def _check_pairs(images: Tensor, baseline_images: Tensor, prompts: Sequence[str]) -> None:
    if images.shape != baseline_images.shape:
        raise ValueError(
            f"win rate: images {tuple(images.shape)} and baseline_images "
            f"{tuple(baseline_images.shape)} differ"
        )
    if images.shape[0] != len(prompts):
        raise ValueError(f"win rate: {images.shape[0]} images but {len(prompts)} prompts")
