"""benchmarks/win_rate_scale.py: the oracle best-of-k win rate against another sample."""

from __future__ import annotations

import pytest
import torch

from diffalign.world.dataset import ShapesGenerator
from diffalign.world.raters import RaterPanel
from tests.benchmarks.helpers import load_benchmark


def _module():
    return load_benchmark("win_rate_scale")


def _samples(prompts_count=12, per_prompt=8, seed=0):
    """`per_prompt` renderings for each of `prompts_count` distinct prompts; a third of them show
    another prompt's scene instead."""
    gen = ShapesGenerator()
    g = torch.Generator().manual_seed(seed)
    distinct = torch.randperm(len(gen.metadata), generator=g)[:prompts_count]
    ids = distinct.repeat_interleave(per_prompt)
    wrong = torch.rand(len(ids), generator=g) < 1 / 3
    shown = torch.where(wrong, gen.sample_prompt_ids(len(ids), g), ids)
    images = (gen.render(gen.scenes_for(shown, g)).clamp(0, 1) * 255).round().to(torch.uint8)
    return images, [gen.metadata[i]["prompt"] for i in ids.tolist()]


def test_best_of_k_wins_more_as_k_grows_and_best_of_one_is_a_coin_flip():
    module = _module()
    images, prompts = _samples()
    panel = RaterPanel()
    features = panel.features(images, prompts)
    one = module.best_of_k_win_rate(features, panel, 1)
    four = module.best_of_k_win_rate(features, panel, 4)
    assert one["prompts"] == four["prompts"] == 12
    assert abs(one["win_rate"] - 0.5) < 0.1
    assert four["win_rate"] > one["win_rate"] + 0.1
    assert four["ci95"][0] <= four["win_rate"] <= four["ci95"][1]


def test_prompts_with_too_few_samples_are_skipped_and_none_left_is_an_error():
    module = _module()
    images, prompts = _samples(prompts_count=3, per_prompt=3)
    panel = RaterPanel()
    features = panel.features(images, prompts)
    assert module.best_of_k_win_rate(features, panel, 2)["prompts"] == 3
    with pytest.raises(ValueError, match="best-of-3"):
        module.best_of_k_win_rate(features, panel, 3)
