"""How good is a reward model? Pairwise accuracy, calibration, rank correlation, data scarcity.

- **Pairwise accuracy** on held-out non-tie pairs: the fraction whose chosen image gets the higher
  reward (an exact reward tie counts half), with a percentile-bootstrap 95% interval over pairs. The
  number to compare it with is the raters' own agreement: no model can predict a noisy rater better
  than the rater's true utility does (the oracle ceiling), and two raters agree less often still
  (ImageReward reports 65.3% single-annotator agreement, Pick-a-Pic 68.0% expert agreement).
- **Expected calibration error** (Guo et al. 2017) of the Bradley–Terry probability
  P(A > B) = sigmoid(r_A - r_B) against the labels prob_a (ties count 0.5): equal-width bins on the
  predicted probability over [0, 1] (10 by default; a probability of exactly 1 goes in the last bin),
  ECE = sum over bins of (n_bin / n) * |mean predicted - mean label|. Every pair enters twice, as
  (p, y) and (1 - p, 1 - y), so the value does not depend on which image happens to be A.
- **Spearman rank correlation** (scipy.stats.spearmanr) of the reward with a gold utility over the
  pairs' images: does the proxy order images the way the truth does?
- **Data-scarcity curve**: held-out accuracy of models trained on nested subsets of growing size.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor

from diffalign.evaluate.stats import bootstrap_mean_ci
from diffalign.prefs.pairs import PreferencePairs
from diffalign.rewards.bt_training import RewardTrainConfig, train_reward_model


def _accepts_group(reward: Callable) -> bool:
    try:
        return "group" in inspect.signature(reward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def reward_margins(
    reward: Callable, pairs: PreferencePairs, *, by_group: bool = True, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """(r_A, r_B) [N] for every pair. A reward that takes `group=` (a learned or ensemble reward)
    scores each pair for its own rater group when `by_group`, else with the pooled reward."""
    grouped = _accepts_group(reward)
    ra, rb = [], []
    for start in range(0, len(pairs), batch_size):
        sl = slice(start, start + batch_size)
        prompts = pairs.prompts[sl]
        images = torch.cat([pairs.images_a[sl], pairs.images_b[sl]])
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if grouped:
            groups = pairs.groups[sl] if by_group else [None] * len(prompts)
            r = reward(images, prompts + prompts, group=groups + groups)
        else:
            r = reward(images, prompts + prompts)
        r = torch.as_tensor(r).detach().float().cpu()
        ra.append(r[: len(prompts)])
        rb.append(r[len(prompts) :])
    return torch.cat(ra), torch.cat(rb)


def pairwise_accuracy(
    margin: Tensor, prob_a: Tensor, n_boot: int = 1000, seed: int = 0
) -> dict[str, float | int | list[float]]:
    """Accuracy on the non-tie pairs of `margin` = r_A - r_B, with a bootstrap 95% interval."""
    margin, prob_a = torch.as_tensor(margin).float(), torch.as_tensor(prob_a).float()
    if margin.shape != prob_a.shape:
        raise ValueError(f"pairwise accuracy: {margin.numel()} margins but {prob_a.numel()} labels")
    bad = int((~torch.isfinite(margin)).sum())
    if bad:  # a NaN margin would count as a wrong pair, silently
        raise ValueError(f"pairwise accuracy: {bad} of {margin.numel()} reward margins are not finite")
    keep = prob_a != 0.5
    n = int(keep.sum())
    if n == 0:
        raise ValueError("pairwise accuracy needs at least one non-tie pair")
    won = torch.where(prob_a[keep] > 0.5, margin[keep], -margin[keep])
    correct = ((won > 0).float() + 0.5 * (won == 0).float()).numpy()
    lo, hi = bootstrap_mean_ci(correct, n_boot=n_boot, seed=seed)
    return {"accuracy": float(correct.mean()), "ci95": [lo, hi], "pairs": n}


def expected_calibration_error(
    prob: Tensor, labels: Tensor, n_bins: int = 10, symmetric: bool = True
) -> float:
    """ECE of predicted P(A > B) `prob` against labels in [0, 1] (see the module doc for the binning)."""
    p = torch.as_tensor(prob, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels, dtype=torch.float64).flatten()
    if p.numel() != y.numel():
        raise ValueError(f"ECE: {p.numel()} predictions but {y.numel()} labels")
    if p.numel() == 0:
        raise ValueError("ECE needs at least one prediction")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if symmetric:
        p, y = torch.cat([p, 1 - p]), torch.cat([y, 1 - y])
    bins = torch.clamp((p * n_bins).long(), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if bool(sel.any()):
            ece += float(sel.double().mean()) * abs(float(p[sel].mean() - y[sel].mean()))
    return ece


def spearman(x: Sequence[float] | Tensor | np.ndarray, y: Sequence[float] | Tensor | np.ndarray) -> float:
    """Spearman's rho of two equally long sequences (scipy.stats.spearmanr)."""
    a = np.asarray(torch.as_tensor(x).detach().cpu().double())
    b = np.asarray(torch.as_tensor(y).detach().cpu().double())
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman: shapes {a.shape} and {b.shape} must be equal and 1-D")
    if a.size < 2:
        raise ValueError("spearman needs at least two values")
    return float(spearmanr(a, b).statistic)


@torch.no_grad()
def spearman_with_gold(
    reward: Callable, gold: Callable, pairs: PreferencePairs, batch_size: int = 256
) -> float:
    """Spearman's rho between the (pooled) reward and `gold(images, prompts)` over the pairs' images."""
    r_a, r_b = reward_margins(reward, pairs, by_group=False, batch_size=batch_size)
    g_a, g_b = reward_margins(gold, pairs, by_group=False, batch_size=batch_size)
    return spearman(torch.cat([r_a, r_b]), torch.cat([g_a, g_b]))


def evaluate_reward(
    reward: Callable,
    pairs: PreferencePairs,
    *,
    gold: Callable | None = None,
    ceiling: dict | None = None,
    n_bins: int = 10,
    n_boot: int = 1000,
    by_group: bool = True,
) -> dict:
    """The full report on held-out `pairs`: accuracy with its CI, ECE, BT loss, optional Spearman with
    a gold utility, and the raters' agreement ceiling (`ceiling`, e.g. from `panel_ceiling`) beside it.
    `pairs` counts every pair and `ties` the tied ones (ECE and the BT loss use all of them);
    `accuracy_pairs` the non-tie pairs the accuracy is taken over."""
    from diffalign.rewards.bt_training import bt_loss

    r_a, r_b = reward_margins(reward, pairs, by_group=by_group)
    margin = r_a - r_b
    accuracy = pairwise_accuracy(margin, pairs.prob_a, n_boot=n_boot)
    # "pairs" counts every pair, ties too (ECE and the BT loss use them); accuracy only the others
    report: dict = {"pairs": len(pairs), "ties": int(pairs.is_tie.sum()), "accuracy_pairs": accuracy["pairs"]}
    report.update({k: v for k, v in accuracy.items() if k != "pairs"})
    report["ece"] = expected_calibration_error(torch.sigmoid(margin), pairs.prob_a, n_bins=n_bins)
    report["ece_bins"] = n_bins
    report["bt_loss"] = float(bt_loss(margin, pairs.prob_a))
    if gold is not None:
        report["spearman_gold"] = spearman_with_gold(reward, gold, pairs)
    if ceiling is not None:
        report["ceiling"] = ceiling
    return report


def data_scarcity_curve(
    pairs: PreferencePairs,
    sizes: Sequence[int] = (125, 250, 500, 1000, 2000),
    *,
    test: PreferencePairs | None = None,
    config: RewardTrainConfig | None = None,
    test_fraction: float = 0.2,
    rater_conditioned: bool = False,
    epochs_for_size: Callable[[int], int] | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Held-out accuracy of reward models trained on nested subsets of `pairs` (the first `size` pairs of
    one seeded permutation, so every subset contains the smaller ones).

    Each model early-stops on `config.held_out_fraction` of its own subset; accuracy is measured on
    `test` (default: `test_fraction` of `pairs`, split off before the subsets are drawn). Sizes larger
    than the training pool are left out. `epochs_for_size(size)` overrides `config.epochs` per size
    (small subsets need more passes for the same number of optimiser steps).
    """
    config = config or RewardTrainConfig()
    pool = pairs
    if test is None:
        pool, test = pairs.split(test_fraction, seed=config.seed)
    if not bool((~test.is_tie).any()):  # checked before any model is trained on it
        raise ValueError(
            f"data_scarcity_curve: the {len(test)} test pairs hold no pair with a winner to score accuracy on"
        )
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(config.seed + 7))
    rows = []
    for size in sorted(set(int(s) for s in sizes)):
        if size > len(pool) or size < 2:
            continue
        result = train_reward_model(
            pool.select(perm[:size]), replace(config), rater_conditioned=rater_conditioned
        )
        r_a, r_b = reward_margins(result.model, test)
        row = {"size": size, **pairwise_accuracy(r_a - r_b, test.prob_a), "epochs": len(result.history)}
        rows.append(row)
        if on_log is not None:
            on_log(row)
    if not rows:
        raise ValueError(f"data_scarcity_curve: no size in {list(sizes)} fits the {len(pool)} training pairs")
    return rows


def panel_ceiling(panel, pairs: PreferencePairs) -> dict:
    """The raters' agreement on `pairs`, from a `diffalign.world.raters.RaterPanel` that could have
    labelled them: `two_rater` (two raters agree), `oracle` (the best any predictor blind to the rater
    can do: the panel's own pooled utility) and `oracle_by_group` (the same, told the rater's group)."""
    report = panel.agreement(pairs.images_a, pairs.images_b, pairs.prompts)
    d = report.to_dict()
    return {k: d[k] for k in ("two_rater", "oracle", "oracle_by_group", "tie_rate", "n_pairs")} | {
        "per_group_disagreement": d["per_group_disagreement"]
    }
