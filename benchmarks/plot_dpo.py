"""Win rate against labelled pairs for offline and online DPO (issue 6's figure).

Reads one or more results.json files of `benchmarks/dpo.py` and draws one panel: the gold panel's
win rate against the base model (with its 95% interval as a band) against the number of labelled
pairs. Rows are grouped into lines by model, method (offline, "online 4x500", ...), labels, steps,
judged prompts and the `--set` overrides, so runs with different recipes never share a line; a line
may gather rows from several files (offline 500, 2,000 and 8,000 pairs are usually separate runs).
Dashed reference lines mark the base (0.5), the acceptance target (0.65) and, with --best-of-2, an
oracle's figure from `benchmarks/win_rate_scale.py`.

    python benchmarks/plot_dpo.py bench_500/results.json bench_2000/results.json \\
        bench_online/results.json --best-of-2 0.642 --out docs/images/dpo_win_rate.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffalign.demo.plots import Panel, Series, line_panels, save_figure

TARGET_WIN_RATE = 0.65


def line_key(args: dict, row: dict) -> tuple:
    """What must be equal for two rows to sit on one line."""
    method = row["method"]
    recipe = tuple(args.get("set") or [])
    steps = "steps per round" if method.startswith("online") else row.get("steps")
    return (row["model"], method, steps, row.get("prompts"), args.get("lr"), args.get("beta"), recipe)


def line_label(key: tuple) -> str:
    model, method, steps, prompts, lr, beta, recipe = key
    extras = [*recipe, *(f"{name}={v}" for name, v in (("lr", lr), ("beta", beta)) if v is not None)]
    label = f"{model}, {method}" + (f" {steps} steps" if isinstance(steps, int) else "")
    if extras:
        label += " (" + ", ".join(e.replace("timestep_range=", "t in ") for e in extras) + ")"
    return f"{label}, {prompts} prompts" if prompts else label


def dpo_series(paths: list[Path]) -> list[Series]:
    """One series per line of `line_key`, points sorted by labelled pairs (ValueError naming a file
    that is not a dpo.py results.json, or two rows of one line at the same pair count)."""
    lines: dict[tuple, dict[int, tuple[float, float, float]]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "runs" not in data or "args" not in data:
            raise ValueError(f"{path}: not a benchmarks/dpo.py results.json (no 'args' and 'runs')")
        for number, row in enumerate(data["runs"]):
            missing = {"model", "method", "pairs", "win_rate", "ci95"} - set(row)
            if missing:
                raise ValueError(f"{path}: run {number} lacks {sorted(missing)}")
            points = lines.setdefault(line_key(data["args"], row), {})
            if row["pairs"] in points:
                raise ValueError(
                    f"{path}: run {number} ({row['method']}, {row['pairs']} pairs) repeats a point of "
                    "another file with the same recipe; pass one of them"
                )
            lo, hi = row["ci95"]
            points[row["pairs"]] = (row["win_rate"], lo, hi)
    series = []
    for key, points in lines.items():
        xs = sorted(points)
        series.append(
            Series(
                line_label(key),
                [float(x) for x in xs],
                [points[x][0] for x in xs],
                lower=[points[x][1] for x in xs],
                upper=[points[x][2] for x in xs],
            )
        )
    return series


def win_rate_panel(paths: list[Path], best_of_2: float | None = None) -> Panel:
    references = [(0.5, "the base (0.5)"), (TARGET_WIN_RATE, f"target ({TARGET_WIN_RATE})")]
    if best_of_2 is not None:
        references.append((best_of_2, f"oracle best of 2 base samples ({best_of_2})"))
    return Panel(
        "DPO: gold panel's win rate against the base",
        "labelled pairs",
        "win rate vs base (95% CI)",
        dpo_series(paths),
        references=references,
        xscale="log",
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="benchmarks/dpo.py results.json files")
    parser.add_argument("--best-of-2", type=float, default=None, help="oracle best-of-2 win rate to mark")
    parser.add_argument("--out", type=Path, default=Path("dpo_win_rate.png"))
    args = parser.parse_args(argv)
    figure = line_panels([win_rate_panel(args.files, args.best_of_2)], panel_size=(7.5, 4.2))
    return save_figure(figure, args.out)


if __name__ == "__main__":
    main()
