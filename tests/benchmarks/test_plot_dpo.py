"""benchmarks/plot_dpo.py: how rows of dpo.py's results.json files become lines, and the figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.benchmarks.helpers import load_benchmark


def _row(method: str, pairs: int, win: float, steps: int = 300, prompts: int = 300) -> dict:
    return {
        "model": "base",
        "method": method,
        "pairs": pairs,
        "steps": steps,
        "prompts": prompts,
        "win_rate": win,
        "ci95": [win - 0.03, win + 0.03],
    }


def _write(path: Path, runs: list[dict], recipe: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": {"set": recipe, "lr": None, "beta": None}, "runs": runs}))
    return path


def test_rows_of_one_recipe_join_one_line_across_files(tmp_path):
    module = load_benchmark("plot_dpo")
    hi = ["timestep_range=[0.5,1.0]"]
    files = [
        _write(tmp_path / "a" / "results.json", [_row("offline", 2000, 0.567)], hi),
        _write(tmp_path / "b" / "results.json", [_row("offline", 500, 0.52)], hi),
        _write(tmp_path / "c" / "results.json", [_row("offline", 2000, 0.499)], []),
        _write(
            tmp_path / "d" / "results.json",
            [_row("online 4x500", 500, 0.51, steps=75), _row("online 4x500", 1000, 0.55, steps=150)],
            hi,
        ),
    ]
    series = module.dpo_series(files)
    by_label = {s.label: s for s in series}
    assert set(by_label) == {
        "base, offline 300 steps (t in [0.5,1.0]), 300 prompts",
        "base, offline 300 steps, 300 prompts",
        "base, online 4x500 (t in [0.5,1.0]), 300 prompts",
    }
    offline = by_label["base, offline 300 steps (t in [0.5,1.0]), 300 prompts"]
    assert offline.x == [500.0, 2000.0] and offline.y == [0.52, 0.567]
    assert offline.lower == pytest.approx([0.49, 0.537]) and offline.upper == pytest.approx([0.55, 0.597])
    online = by_label["base, online 4x500 (t in [0.5,1.0]), 300 prompts"]
    assert online.x == [500.0, 1000.0] and online.y == [0.51, 0.55]  # rounds of one run share a line


def test_figure_written_and_bad_files_refused(tmp_path):
    module = load_benchmark("plot_dpo")
    good = _write(tmp_path / "a" / "results.json", [_row("offline", 2000, 0.567)], [])
    out = module.main([str(good), "--best-of-2", "0.642", "--out", str(tmp_path / "fig" / "dpo.png")])
    width, height = Image.open(out).size
    assert width > height > 100
    panel = module.win_rate_panel([good], best_of_2=0.642)
    assert [value for value, _ in panel.references] == [0.5, 0.65, 0.642]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match=r"other\.json: not a benchmarks/dpo\.py results\.json"):
        module.dpo_series([other])
    broken = _write(tmp_path / "b" / "results.json", [{"model": "base", "method": "offline"}], [])
    with pytest.raises(ValueError, match=r"run 0 lacks \['ci95', 'pairs', 'win_rate'\]"):
        module.dpo_series([broken])
    again = _write(tmp_path / "c" / "results.json", [_row("offline", 2000, 0.5)], [])
    with pytest.raises(ValueError, match="repeats a point"):
        module.dpo_series([good, again])
