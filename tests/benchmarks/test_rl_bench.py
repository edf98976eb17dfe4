"""benchmarks/rl.py end to end on a tiny random model: a DiffusionNFT run stops at its CPU budget and
writes the gold-accuracy curve (the base point first, failure modes per task) with the run's config."""

from __future__ import annotations

import json
import sys

import pytest

from tests.align.helpers import save_tiny_model
from tests.benchmarks.helpers import load_benchmark


def test_nft_run_stops_at_its_budget_and_writes_the_curve(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "model", "epsilon")
    out = tmp_path / "bench"
    argv = ["rl.py", "--model", str(model), "--method", "nft", "--minutes", "0.001", "--eval-every", "1"]
    argv += ["--eval-samples", "1", "--out", str(out), "num_steps=2", "prompts_per_epoch=2"]
    argv += ["samples_per_prompt=2", "sample_batch_size=4", "train_batch_size=4", "grid_every=0"]
    monkeypatch.setattr(sys, "argv", argv)
    load_benchmark("rl").main()
    record = json.loads((out / "curve.json").read_text())
    assert record["config"]["method"] == "nft" and record["config"]["timesteps_per_sample"] == 2
    assert [p["epoch"] for p in record["curve"]] == [0, 1]  # the budget is spent after one epoch
    for point in record["curve"]:
        assert 0.0 <= point["overall"] <= 1.0 and len(point["tasks"]) == 6
        assert set(point["failure_modes"]) == set(point["tasks"])
        for tag, accuracy in point["tasks"].items():  # every failing task names how its images failed
            modes = point["failure_modes"][tag]
            assert all(0.0 < share <= 1.0 for share in modes.values())
            assert (accuracy < 1.0) == bool(modes) and sum(modes.values()) >= 1.0 - accuracy - 1e-9
    assert record["curve"][1]["reward_queries"] == 4 and record["curve"][1]["train_cpu_seconds"] > 0
    assert all(point["guidance"] == 3.0 and "by_guidance" not in point for point in record["curve"])


def test_a_cfg_free_run_is_judged_with_its_own_guidance_and_the_others_asked(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "model", "epsilon")
    out = tmp_path / "bench"
    argv = ["rl.py", "--model", str(model), "--method", "nft", "--minutes", "0.001", "--eval-every", "1"]
    argv += ["--eval-samples", "1", "--out", str(out), "--eval-guidance", "1,3", "num_steps=2"]
    argv += ["prompts_per_epoch=2", "samples_per_prompt=2", "sample_batch_size=4", "train_batch_size=4"]
    argv += ["grid_every=0", "guidance_scale=1"]
    monkeypatch.setattr(sys, "argv", argv)
    bench = load_benchmark("rl")
    judged: list[float] = []
    real = bench.gold_accuracy

    def spy(model, lines, samples, batch=50, guidance=3.0):
        judged.append(guidance)
        return real(model, lines, samples, batch=batch, guidance=guidance)

    monkeypatch.setattr(bench, "gold_accuracy", spy)
    bench.main()
    record = json.loads((out / "curve.json").read_text())
    assert record["config"]["guidance_scale"] == 1.0
    assert judged == [1.0, 3.0, 1.0, 3.0]  # base point and epoch 1, each with both samplers
    for point in record["curve"]:
        assert point["guidance"] == 1.0 and set(point["by_guidance"]) == {"1.0", "3.0"}
        assert point["by_guidance"]["1.0"] == point["overall"]


def test_an_unreadable_eval_guidance_is_named_before_anything_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    argv = ["rl.py", "--model", "base", "--out", str(out), "--eval-guidance", "1,three"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        load_benchmark("rl").main()
    assert stop.value.code == 2 and "--eval-guidance '1,three'" in capsys.readouterr().err
    assert not out.exists()
