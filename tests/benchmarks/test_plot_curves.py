"""benchmarks/plot_curves.py: the series it reads from each benchmark's file, and the figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.benchmarks.helpers import load_benchmark


def _module():
    return load_benchmark("plot_curves")


def _files(tmp_path: Path) -> tuple[Path, Path]:
    base = {"step": 0, "reward_queries": 0, "train_seconds": 0.0, "gold_accuracy": 0.5}
    backprop = {
        "base": {"gold_accuracy": 0.5},
        "methods": [
            {
                "method": "draft",
                "curve": [
                    base,
                    {"step": 5, "reward_queries": 40, "train_seconds": 9.5, "gold_accuracy": 0.6},
                ],
            },
            {
                "method": "refl",
                "curve": [
                    base,
                    {"step": 5, "reward_queries": None, "train_seconds": 3.0, "gold_accuracy": 0.1},
                ],
            },
        ],
    }
    rl = {
        "config": {"method": "grpo"},
        "curve": [
            {"epoch": 0, "reward_queries": 0, "train_2core_minutes": 0.0, "overall": 0.62},
            {"epoch": 10, "reward_queries": 320, "train_2core_minutes": 5.0, "overall": 0.7},
        ],
    }
    (tmp_path / "bp").mkdir()
    (tmp_path / "rl").mkdir()
    a, b = tmp_path / "bp" / "results.json", tmp_path / "rl" / "curve.json"
    a.write_text(json.dumps(backprop))
    b.write_text(json.dumps(rl))
    return a, b


def test_series_from_both_benchmarks(tmp_path):
    module = _module()
    a, b = _files(tmp_path)
    queries, seconds = module.curve_panels([a, b])
    assert [s.label for s in queries.series] == ["draft (bp)", "refl (bp)", "grpo (rl)"]
    assert queries.series[0].x == [0, 40] and queries.series[0].y == [0.5, 0.6]
    assert seconds.series[0].x == [0.0, 9.5]
    assert queries.series[1].x == [0]  # a point without a query count is left out
    assert queries.series[2].x == [0, 320] and seconds.series[2].x == [
        0.0,
        300.0,
    ]  # 2-core minutes as seconds
    assert seconds.series[2].y == [0.62, 0.7]


def test_figure_is_written_and_other_files_are_refused(tmp_path):
    module = _module()
    a, b = _files(tmp_path)
    out = module.main([str(a), str(b), "--out", str(tmp_path / "fig" / "curves.png")])
    width, height = Image.open(out).size
    assert width > height > 100
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match=r"other\.json: neither"):
        module.curve_panels([bad])
