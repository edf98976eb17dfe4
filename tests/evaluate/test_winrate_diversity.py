"""Win rate, its bootstrap interval, and the diversity measures on synthetic inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffalign.evaluate.diversity import mean_pairwise_distance, per_prompt_variety, pixel_features
from diffalign.evaluate.winrate import reward_win_rate, win_rate_from_scores


def test_win_rate_and_ci_cover_truth_on_synthetic_scores():
    rng = np.random.default_rng(0)
    prompts = [f"p{i}" for i in range(200)]
    scores = (rng.random(200) < 0.7).astype(float)  # true win rate 0.7
    result = win_rate_from_scores(scores, prompts, "synthetic")
    assert result.win_rate == pytest.approx(scores.mean())
    lo, hi = result.ci95
    assert lo < scores.mean() < hi
    assert hi - scores.mean() == pytest.approx(scores.mean() - lo, abs=0.02)  # ~symmetric at n=200
    # the 95% interval of a Bernoulli mean over 200 prompts has half-width ~1.96 sqrt(.21/200) = 0.064
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.21 / 200), rel=0.25)
    assert result.pairs == 200 and result.prompts == 200


def test_ci_resamples_prompts_not_pairs():
    # Two prompts with 50 samples each, one always won and one always lost: the per-prompt means are
    # 1 and 0, so the interval spans [0, 1]; a bootstrap over 100 pairs would give ~0.5 +- 0.1.
    prompts = ["a"] * 50 + ["b"] * 50
    scores = [1.0] * 50 + [0.0] * 50
    result = win_rate_from_scores(scores, prompts, "synthetic")
    assert result.prompts == 2
    assert result.ci95[0] == 0.0 and result.ci95[1] == 1.0


def test_reward_win_rate_counts_ties_half():
    images = torch.zeros(4, 3, 2, 2)
    baseline = torch.zeros(4, 3, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([0.9, 0.1, 0.5, 0.5])
    baseline[:, 0, 0, 0] = torch.tensor([0.1, 0.9, 0.5, 0.2])

    def brightness(x, prompts):
        return x[:, 0, 0, 0]

    result = reward_win_rate(brightness, images, baseline, ["p"] * 4, name="brightness")
    assert result.win_rate == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert result.judge == "brightness"


def test_win_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="prompts"):
        win_rate_from_scores([0.5, 0.5], ["p"], "x")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_rate_from_scores([1.5], ["p"], "x")
    with pytest.raises(ValueError, match="baseline_images"):
        reward_win_rate(
            lambda x, p: x.sum((1, 2, 3)), torch.zeros(2, 3, 2, 2), torch.zeros(3, 3, 2, 2), ["a", "b"]
        )


def test_mean_pairwise_distance_matches_a_direct_loop():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    pairs = [float((x[i] - x[j]).norm()) for i in range(6) for j in range(i + 1, 6)]
    assert mean_pairwise_distance(x) == pytest.approx(np.mean(pairs))


def test_per_prompt_variety_sees_collapse_that_set_diversity_misses():
    # Prompt a: two different images; prompt b: two copies of one image (collapsed).
    images = torch.zeros(4, 3, 4, 4)
    images[1] = 1.0
    images[2] = 0.5
    images[3] = 0.5
    feats = pixel_features(images)
    assert per_prompt_variety(feats, ["a", "a", "b", "b"]) == pytest.approx((1.0 + 0.0) / 2)
    assert math.isnan(per_prompt_variety(feats, ["a", "b", "c", "d"]))
    assert mean_pairwise_distance(feats) > 0.4


def test_pixel_variety_equals_the_training_log_diversity():
    # align/online_metrics.diversity logs the same quantity during training; they must agree so that
    # one can call the other.
    from diffalign.align.online_metrics import diversity

    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a", "a", "a", "b", "b", "c"]
    assert per_prompt_variety(pixel_features(images), prompts) == pytest.approx(diversity(images, prompts))
