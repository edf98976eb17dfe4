"""benchmarks/dpo.py: relabelling the pairs by the gold utility or one feature, and a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.prefs.pairs import PreferencePairs
from diffalign.world.dataset import ShapesGenerator
from diffalign.world.raters import TASTE_FEATURES, RaterPanel
from tests.benchmarks.helpers import load_benchmark


def _rendered_pairs(n=24, seed=0) -> PreferencePairs:
    """Two renderings of each of n prompts (different layouts), labelled A wins throughout."""
    gen = ShapesGenerator()
    g = torch.Generator().manual_seed(seed)
    first = gen.sample(n, g)
    second = gen.render(gen.scenes_for(first.prompt_ids, g))
    u8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731
    return PreferencePairs(first.prompts, u8(first.images), u8(second), torch.ones(n))


def test_relabel_by_a_feature_makes_the_image_with_more_of_it_the_winner():
    module = load_benchmark("dpo")
    panel = RaterPanel()
    pairs = _rendered_pairs()
    size_a = panel.features(pairs.images_a, pairs.prompts).taste[:, TASTE_FEATURES.index("size")]
    size_b = panel.features(pairs.images_b, pairs.prompts).taste[:, TASTE_FEATURES.index("size")]
    margin = 0.05
    relabelled = module.relabel(pairs, panel, "size", margin)
    kept = (size_a - size_b).abs() > margin
    assert 0 < len(relabelled) == int(kept.sum()) < len(pairs)
    assert relabelled.prob_a.tolist() == (size_a - size_b)[kept].gt(0).float().tolist()
    assert relabelled.prompts == [p for p, k in zip(pairs.prompts, kept.tolist()) if k]


def test_gold_labels_follow_the_pooled_utility_and_panel_labels_are_kept():
    module = load_benchmark("dpo")
    panel = RaterPanel()
    pairs = _rendered_pairs(seed=1)
    delta = panel.utility(pairs.images_a, pairs.prompts) - panel.utility(pairs.images_b, pairs.prompts)
    gold = module.relabel(pairs, panel, "gold", 0.0)  # 0: the panel's tie margin
    kept = delta.abs() > panel.config.tie_margin
    assert gold.prob_a.tolist() == delta[kept].gt(0).float().tolist()
    assert module.relabel(pairs, panel, "panel", 0.0) is pairs


def test_relabel_refuses_an_unknown_feature_and_a_margin_nothing_passes():
    module = load_benchmark("dpo")
    panel = RaterPanel()
    pairs = _rendered_pairs(n=6)
    with pytest.raises(ValueError, match="unknown label feature 'hue'"):
        module.relabel(pairs, panel, "hue", 0.0)
    with pytest.raises(ValueError, match=r"--labels centrality: no pair differs by more than 2\.0"):
        module.relabel(pairs, panel, "centrality", 2.0)


def test_one_store_for_several_models_is_refused(tmp_path, capsys):
    module = load_benchmark("dpo")
    with pytest.raises(SystemExit):
        module.main(["--models", "base,base-flow", "--store", str(tmp_path / "s.db"), "--out", str(tmp_path)])
    assert "a store holds one model's samples" in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists()


def test_a_tiny_relabelled_run_writes_its_row_with_what_moved(tmp_path):
    module = load_benchmark("dpo")
    out = tmp_path / "bench"
    argv = ["--models", "base", "--pairs", "8", "--steps", "2", "--batch-size", "4", "--eval-prompts", "8"]
    argv += ["--eval-stride", "2", "--sample-batch", "8", "--labels", "quality", "--label-margin", "0"]
    assert module.main([*argv, "--store", str(tmp_path / "prefs.db"), "--out", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())["runs"]
    assert row["method"] == "offline, quality labels" and row["prompts"] == 4
    assert set(row["means_tuned"]) == {"utility", "quality", *TASTE_FEATURES}
    assert 0.0 <= row["win_rate"] <= 1.0
    # the pooled panel is the groups' mixture by share (bold and calm, half each)
    by_group = row["win_rate_by_group"]
    assert set(by_group) == {"bold", "calm"}
    assert row["win_rate"] == pytest.approx((by_group["bold"] + by_group["calm"]) / 2, abs=1e-6)
    parts = row["faithfulness"]
    assert sum(part["share"] for part in parts.values()) == pytest.approx(1.0)
    weighted = sum(p["share"] * p["win_rate"] for p in parts.values() if p["win_rate"] is not None)
    assert weighted == pytest.approx(row["win_rate"], abs=1e-6)
    assert (out / "base" / "dpo-8-quality").is_dir() and (tmp_path / "prefs.db").is_file()


def test_training_seeds_give_one_run_each_and_a_pooled_row(tmp_path):
    module = load_benchmark("dpo")
    out = tmp_path / "bench"
    argv = ["--models", "base", "--pairs", "8", "--steps", "2", "--batch-size", "4", "--eval-prompts", "8"]
    argv += ["--eval-stride", "2", "--sample-batch", "8", "--seeds", "1,2", "--store", str(tmp_path / "p.db")]
    assert module.main([*argv, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [r["seed"] for r in runs] == [1, 2]
    assert all((out / "base" / f"dpo-8-seed{s}").is_dir() for s in (1, 2))
    seeds_of = [json.loads((out / "base" / f"dpo-8-seed{s}" / "config.json").read_text()) for s in (1, 2)]
    assert [c["config"]["runtime"]["seed"] for c in seeds_of] == [1, 2]
    (pooled,) = results["seed_summary"]
    rates = [r["win_rate"] for r in runs]
    assert pooled["seeds"] == [1, 2] and pooled["mean_win_rate"] == pytest.approx(sum(rates) / 2)
    assert (pooled["min_win_rate"], pooled["max_win_rate"]) == (min(rates), max(rates))


def test_seeds_and_a_set_seed_are_refused_together(tmp_path, capsys):
    module = load_benchmark("dpo")
    with pytest.raises(SystemExit):
        module.main(["--seeds", "0,1", "--set", "runtime.seed=3", "--out", str(tmp_path)])
    assert "give the training seeds one way" in capsys.readouterr().err


def test_renderings_are_faithful_images_of_each_judging_prompt_and_a_row_of_their_own(tmp_path):
    from diffalign.world.shapeseval import load_shapeseval

    module = load_benchmark("dpo")
    metadata = load_shapeseval()[::25]
    images = module.renderings(metadata, 32, seed=3)
    assert images.dtype == torch.uint8 and images.shape == (len(metadata), 3, 32, 32)
    features = RaterPanel().features(images, [m["prompt"] for m in metadata])
    assert bool(features.correct.all())  # every rendering holds its prompt's clauses
    assert torch.equal(images, module.renderings(metadata, 32, seed=3))
    assert not torch.equal(images, module.renderings(metadata, 32, seed=4))

    out = tmp_path / "bench"
    module.main(
        ["--models", "base", "--pairs", "0", "--renderings", "--eval-prompts", "6", "--out", str(out)]
    )
    (row,) = json.loads((out / "results.json").read_text())["runs"]
    assert row["method"] == "world renderings (no training)" and row["accuracy_tuned"] == 1.0
    assert 0.0 <= row["ci95"][0] <= row["win_rate"] <= row["ci95"][1] <= 1.0
