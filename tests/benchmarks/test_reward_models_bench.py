"""benchmarks/reward_models.py end to end on a tiny run: one shared pretraining, members on every pair."""

import json
import sys

import torch

from tests.benchmarks.helpers import load_benchmark

torch.set_num_threads(1)


def test_shared_pretraining_whole_data_ensemble_without_the_conditioned_model(tmp_path, monkeypatch, capsys):
    bench = load_benchmark("reward_models")
    calls = []
    real_initial = bench.initial_model

    def counting_initial(*args, **kwargs):
        calls.append(1)
        return real_initial(*args, **kwargs)

    monkeypatch.setattr(bench, "initial_model", counting_initial)
    argv = [
        "reward_models.py",
        "--images", "world",
        "--train-pairs", "40",
        "--test-pairs", "24",
        "--epochs", "1",
        "--ensemble", "2",
        "--sizes", "40",
        "--pretrain-steps", "2",
        "--shared-pretraining",
        "--no-bootstrap",
        "--skip-conditioned",
        "--threads", "1",
        "--set", "batch_size=8",
        "--out", str(tmp_path),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    results = json.loads((tmp_path / "results.json").read_text())
    assert calls == [1]  # the pooled model and both members start from one pretraining
    assert results["conditioned_all"] is None and results["disagreement"] == {}
    members = results["ensemble"]["members"]
    assert len(members) == 2 and all(0 <= a <= 1 for a in members)
    # member 0 fits the same pairs with the same seed from the same start as the pooled model
    assert members[0] == results["scarcity_curve"][-1]["accuracy"]
    assert "--no-bootstrap --skip-conditioned" in results["command"]
    out = capsys.readouterr().out
    assert "ensemble of 2 held-out accuracy" in out and "conditioned" not in out.split("|---|---|", 1)[1]
