"""benchmarks/plot_overopt.py: checkpoints placed by the run's reward queries, paired changes, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffalign.evaluate.overopt import OveroptPoint, analyse
from tests.benchmarks.helpers import load_benchmark


def _report(tmp_path: Path, name: str = "run") -> Path:
    """A run folder with metrics.jsonl (32 queries a step) and an overopt report of three points."""
    run = tmp_path / name
    run.mkdir()
    lines = [json.dumps({"step": s, "reward_queries": 32 * s, "loss": 0.1}) for s in range(1, 11)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    base_proxy = [0.0, 1.0, 2.0, 3.0]
    points = [
        OveroptPoint(0, 0.0, 0.0, 1.5, 1.0, extra={"acc": 0.5},
                     values={"proxy": base_proxy, "gold": [1, 1, 1, 1], "acc": [0, 1, 0, 1]}),
        OveroptPoint(5, 1.0, 0.1, 2.5, 1.25, extra={"acc": 0.75},
                     values={"proxy": [1.0, 2.5, 3.0, 4.5], "gold": [1, 2, 1, 1], "acc": [1, 1, 0, 1]}),
        OveroptPoint(10, 4.0, 0.1, 4.5, 0.75, extra={"acc": 0.25},
                     values={"proxy": [3.0, 5.0, 5.0, 6.0], "gold": [1, 0, 1, 1], "acc": [0, 1, 0, 0]}),
    ]  # fmt: skip
    report = analyse(points, "rl")
    report["run_dir"] = str(run)
    report["rewards"] = {"gold": "gold-utility", "proxy": "rm"}
    path = run / "overopt" / "overopt.json"
    path.parent.mkdir()
    path.write_text(json.dumps(report))
    return path


def test_points_are_placed_by_reward_queries_with_paired_changes(tmp_path):
    module = load_benchmark("plot_overopt")
    columns = module.run_points(_report(tmp_path))
    assert columns["queries"] == [0, 160, 320]
    assert columns["d"] == pytest.approx([0.0, 1.0, 2.0])
    # the proxy's standardised paired change: mean / sd of the per-sample differences
    assert columns["proxy_dz"] == pytest.approx([0.0, 1.25 / np.std([1, 1.5, 1, 1.5], ddof=1), 3.25 / 0.5])
    assert columns["proxy"]["mean"] == pytest.approx([0.0, 1.25, 3.25])
    assert columns["gold"]["mean"] == pytest.approx([0.0, 0.25, -0.25])
    assert columns["acc"]["mean"] == pytest.approx([0.0, 0.25, -0.25])
    table = module.markdown_table([("A", columns)])
    assert "| A | 5 | 160 | 1.0 | +4.33 | +1.250 | +0.250 [" in table
    assert table.count("\n") == 4  # header, rule, three rows


def test_the_script_draws_one_panel_per_reward(tmp_path, monkeypatch, capsys):
    module = load_benchmark("plot_overopt")
    reports = [_report(tmp_path, "a"), _report(tmp_path, "b")]
    out = tmp_path / "fig.png"
    argv = ["plot_overopt.py", *map(str, reports), "--label", "A", "--label", "B", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    width, height = Image.open(out).size
    assert width > 2.5 * height  # three panels side by side: proxy, gold, acc
    printed = capsys.readouterr().out
    assert "| B | 10 | 320 |" in printed


def test_log_queries_leave_the_base_point_out(tmp_path):
    module = load_benchmark("plot_overopt")
    columns = module.run_points(_report(tmp_path))
    panels = module.overopt_panels([("A", columns)], log_queries=True)
    assert all(panel.xscale == "log" for panel in panels)
    gold = panels[1].series[0]
    assert gold.x == [160, 320] and gold.y == pytest.approx([0.25, -0.25]) and len(gold.lower) == 2
    assert panels[0].series[0].x == [160, 320]
    assert [p.xscale for p in module.overopt_panels([("A", columns)])] == ["linear"] * 3


def test_standardised_change_edge_cases():
    module = load_benchmark("plot_overopt")
    assert module.standardised_change([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert np.isnan(module.standardised_change([2.0, 3.0], [1.0, 2.0]))  # a shift with no spread
    assert module.standardised_change([2.0, 2.0], [1.0, 0.0]) == pytest.approx(1.5 / np.std([1, 2], ddof=1))


def test_bad_inputs_name_the_file(tmp_path):
    module = load_benchmark("plot_overopt")
    path = _report(tmp_path)
    metrics = path.parent.parent / "metrics.jsonl"
    kept = path.with_name("overopt.metrics.jsonl")  # a report stored away from its run, metrics beside it
    metrics.rename(kept)
    assert module.run_points(path)["queries"] == [0, 160, 320]
    kept.unlink()
    with pytest.raises(ValueError, match=r"metrics\.jsonl: missing"):
        module.run_points(path)
    report = json.loads(path.read_text())
    for point in report["points"]:
        del point["values"]
    path.write_text(json.dumps(report))
    with pytest.raises(ValueError, match="per-sample values"):
        module.run_points(path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"curve": []}))
    with pytest.raises(ValueError, match="not a `diffalign overopt` report"):
        module.run_points(other)


def test_reports_of_one_run_and_base_point_join_into_one_series(tmp_path):
    module = load_benchmark("plot_overopt")
    path = _report(tmp_path)
    report = json.loads(path.read_text())
    base, early, late = report["points"]
    late["step"] = 8

    def write(name: str, points: list[dict]) -> Path:
        out = path.with_name(name)
        out.write_text(json.dumps({**report, "points": points}))
        return out

    first, later = write("first.json", [base, early]), write("later.json", [base, late])
    joined = module.join_reports([(p, module.run_points(p)) for p in (later, first)])
    assert joined["steps"] == [0, 5, 8] and joined["queries"] == [0, 160, 256]
    assert joined["gold"]["mean"] == pytest.approx([0.0, 0.25, -0.25])
    assert joined["proxy_dz"][2] == pytest.approx(3.25 / 0.5)
    again = write("again.json", [base, {**early}])
    with pytest.raises(ValueError, match=r"both measure steps \[5\]"):
        module.join_reports([(p, module.run_points(p)) for p in (first, again)])
    other_base = {**base, "values": {**base["values"], "gold": [2, 2, 2, 2]}}
    moved = write("moved.json", [other_base, late])
    with pytest.raises(ValueError, match="share a label but not their base point"):
        module.join_reports([(p, module.run_points(p)) for p in (first, moved)])
