"""Curves of gold accuracy against reward queries and against training time, for every method (issue 5).

Reads the files the training benchmarks write and draws one figure with two panels:
- `benchmarks/reward_backprop.py`'s results.json: one series per method (AlignProp, DRaFT, DRaFT-LV,
  ReFL), gold faithfulness accuracy on its fixed evaluation prompts, wall training seconds;
- `benchmarks/rl.py`'s curve.json: one series (the run's method), ShapesEval overall accuracy, and its
  2-core CPU-minutes as seconds (the wall time on two dedicated cores).

Each benchmark evaluates on its own prompt set and sampler (the legend names the file), so compare the
rise of each curve from its own starting point, not the levels of curves from different files.

    python benchmarks/plot_curves.py bench_bp/results.json bench_rl/base/curve.json --out curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffalign.demo.plots import Panel, Series, line_panels, save_figure


def file_series(path: Path) -> list[tuple[Series, Series]]:
    """(against queries, against seconds) series of one results.json or curve.json (ValueError naming
    the file when it is neither)."""
    data = json.loads(path.read_text())
    if "methods" in data and "base" in data:  # reward_backprop.py
        out = []
        for run in data["methods"]:
            points = [p for p in run["curve"] if p.get("reward_queries") is not None]
            label = f"{run['method']} ({path.parent.name})"
            ys = [p["gold_accuracy"] for p in points]
            out.append(
                (
                    Series(label, [p["reward_queries"] for p in points], ys),
                    Series(label, [p["train_seconds"] for p in points], ys),
                )
            )
        return out
    if "curve" in data and "config" in data:  # rl.py
        points = data["curve"]
        label = f"{data['config'].get('method', 'pg')} ({path.parent.name})"
        ys = [p["overall"] for p in points]
        return [
            (
                Series(label, [p["reward_queries"] for p in points], ys),
                Series(label, [60 * p["train_2core_minutes"] for p in points], ys),
            )
        ]
    raise ValueError(f"{path}: neither a reward_backprop.py results.json nor an rl.py curve.json")


def curve_panels(paths: list[Path]) -> list[Panel]:
    """The two panels (gold accuracy against reward queries, against training seconds) of `paths`."""
    by_queries = Panel("gold accuracy vs reward queries", "reward queries", "gold accuracy")
    by_time = Panel("gold accuracy vs training time", "training seconds", "gold accuracy")
    for path in paths:
        for queries, seconds in file_series(path):
            by_queries.series.append(queries)
            by_time.series.append(seconds)
    return [by_queries, by_time]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="results.json / curve.json files")
    parser.add_argument("--out", type=Path, default=Path("curves.png"))
    args = parser.parse_args(argv)
    return save_figure(line_panels(curve_panels(args.files)), args.out)


if __name__ == "__main__":
    main()
