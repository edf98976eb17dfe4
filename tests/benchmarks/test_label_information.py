"""benchmarks/label_information.py: tilted and best-of-k policies over K samples per prompt."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from diffalign.world.dataset import ShapesGenerator
from diffalign.world.raters import RaterPanel
from tests.benchmarks.helpers import load_benchmark


def _module():
    return load_benchmark("label_information")


def test_tilt_matches_a_hand_computation_and_its_limits():
    module = _module()
    scores = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 0.0]])
    beats = torch.tensor([[0.2, 0.5, 0.8], [0.6, 0.4, 0.5]], dtype=torch.float64)
    row = module.tilt(scores, beats, 2.0)
    w = [[math.exp(s / 2.0) for s in prompt] for prompt in scores.tolist()]
    w = [[x / sum(prompt) for x in prompt] for prompt in w]
    win = sum(sum(a * b for a, b in zip(wp, bp)) for wp, bp in zip(w, beats.tolist())) / 2
    kl = sum(sum(x * math.log(3 * x) for x in wp) for wp in w) / 2
    assert row["win_rate"] == pytest.approx(win) and row["kl"] == pytest.approx(kl)
    flat = module.tilt(scores, beats, 1e9)  # uniform: no KL, the mean of beats
    assert flat["kl"] == pytest.approx(0.0, abs=1e-9) and flat["win_rate"] == pytest.approx(0.5)
    sharp = module.tilt(torch.tensor([[0.0, 1.0, 3.0]]), beats[:1], 1e-4)  # the argmax alone
    assert sharp["kl"] == pytest.approx(math.log(3)) and sharp["win_rate"] == pytest.approx(0.8)


def test_best_of_k_equals_enumerating_every_subset():
    module = _module()
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 6, generator=g)
    beats = torch.rand(5, 6, generator=g, dtype=torch.float64)
    for k in (1, 2, 4, 6):
        brute = []
        for p in range(5):
            subsets = list(itertools.combinations(range(6), k))
            brute.append(
                sum(float(beats[p, max(s, key=lambda i: float(scores[p, i]))]) for s in subsets)
                / len(subsets)
            )
        assert module.best_of_k(scores, beats, k)["win_rate"] == pytest.approx(sum(brute) / 5)
    assert module.best_of_k(scores, beats, 1)["win_rate"] == pytest.approx(float(beats.mean()))
    with pytest.raises(ValueError, match="best-of-7 needs 1 <= k <= 6"):
        module.best_of_k(scores, beats, 7)


def test_within_prompt_beats_reads_the_panel_and_averages_to_a_coin_flip():
    module = _module()
    gen = ShapesGenerator()
    g = torch.Generator().manual_seed(3)
    ids = torch.randperm(len(gen.metadata), generator=g)[:4].repeat_interleave(5)
    images = (gen.render(gen.scenes_for(ids, g)).clamp(0, 1) * 255).round().to(torch.uint8)
    prompts = [gen.metadata[i]["prompt"] for i in ids.tolist()]
    panel = RaterPanel()
    features = panel.features(images, prompts)
    beats = module.within_prompt_beats(features, panel, 5)
    assert beats.shape == (4, 5)
    # P(i beats j) + P(j beats i) = 1 for every rater, so each prompt's samples average 0.5
    assert beats.mean(dim=1).tolist() == pytest.approx([0.5] * 4)
    direct = panel.preference_prob(features.select([7, 7, 7, 7]), features.select([5, 6, 8, 9]))
    assert float(beats[1, 2]) == pytest.approx(float(direct.double().mean()))
    with pytest.raises(ValueError, match="divisible by 3"):
        module.within_prompt_beats(features, panel, 3)


def test_ranking_agreement_counts_pairs_in_the_gold_order_past_the_margin():
    module = _module()
    utility = torch.tensor([[0.0, 1.0, 2.0, 2.005]])
    scores = torch.tensor([[0.0, 2.0, 1.0, 5.0]])
    # pairs past the 0.01 margin: (0,1) (0,2) (0,3) (1,2) (1,3), each counted in both orders;
    # the scores reverse (1,2) only
    assert module.ranking_agreement(scores, utility, 0.01) == pytest.approx(4 / 5)
    assert module.ranking_agreement(utility, utility, 0.01) == 1.0


@pytest.mark.slow
def test_a_tiny_run_writes_gold_and_learned_rows(tmp_path, capsys):
    module = _module()
    out = tmp_path / "out"
    argv = [
        "--pairs",
        "24",
        "--per-prompt",
        "3",
        "--eval-stride",
        "100",
        "--best-of",
        "2,3",
        "--out",
        str(out),
    ]
    results = module.main([*argv, "--set", "epochs=2", "batch_size=8"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["gold"] == results["gold"] and len(saved["learned"]) == 1
    learned = saved["learned"][0]
    assert learned["pairs"] == 24 and learned["labels"]["pairs_with_winner"] <= 24
    assert 0.0 <= learned["ranking_agreement"] <= 1.0
    assert [row["k"] for row in learned["best_of"]] == [2, 3]
    kls = [row["kl"] for row in saved["gold"]["tilt"]]
    assert kls == sorted(kls) and kls[-1] <= math.log(3) + 1e-9  # sharper tilts move further
    # the oracle: best of 3 by the panel's own pooled utility beats a random base sample
    assert saved["gold"]["best_of"][-1]["win_rate"] > 0.5
    assert "| reward model, 24 pairs | best of 3 |" in capsys.readouterr().out
    # a rerun reuses the samples (same model, K, prompts)
    stamp = (out / "samples.pt").stat().st_mtime_ns
    module.main([*argv, "--set", "epochs=1"])
    assert (out / "samples.pt").stat().st_mtime_ns == stamp
