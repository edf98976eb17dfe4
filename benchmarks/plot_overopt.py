"""Proxy and gold reward of training runs' checkpoints against reward queries (issue 5: where proxy and
gold part ways when training goes on too long).

Reads `diffalign overopt` reports (RUN/overopt/overopt.json by default), each measured on the same
prompts and seeds at every checkpoint, and the run's metrics.jsonl (which gives each checkpoint's
reward queries; from the run folder, or NAME.metrics.jsonl beside a report NAME.json). Draws one
panel per reward, each checkpoint's change from the base model on the same samples (`vs_base`), the
gold ones with their 95% bootstrap band:
- the proxy (the reward the run optimised) as a standardised paired change: the mean of the per-sample
  differences from the base model over their standard deviation (Cohen's d_z), unit-free, so runs
  that optimised reward models of different scales share one axis;
- the gold reward (`--gold`, e.g. gold-utility), in its own units;
- every reward recorded with `diffalign overopt --also` (e.g. shapes:faithfulness: the gold accuracy).
Prints a markdown table of the same points. `--log-queries` puts reward queries on a log axis (runs
whose checkpoints lie at 40 and at 4,000 queries); the base model, at 0 queries, is then the
reference line at 0 rather than a point.

    python benchmarks/plot_overopt.py RUN_A/overopt/overopt.json RUN_B/overopt/overopt.json \
        --label "GRPO, RM A" --label "GRPO, RM B" --out overopt_runs.png [--log-queries]

Reports given the same label are one series: a run judged again at later checkpoints against the
same base point (`diffalign overopt --base-from`) is drawn as one curve.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diffalign.align.run_dir import METRICS_FILE
from diffalign.align.tracking import read_metrics
from diffalign.demo.plots import Panel, Series, line_panels, save_figure


def metrics_file(report_path: Path, run_dir: str) -> Path:
    """The run's metrics.jsonl: in the report's run folder, or kept beside the report as
    NAME.metrics.jsonl (how benchmarks/results/ stores them)."""
    beside = report_path.with_name(report_path.stem + ".metrics.jsonl")
    in_run = Path(run_dir) / METRICS_FILE
    return in_run if in_run.is_file() or not beside.is_file() else beside


def reward_queries_by_step(path: Path) -> dict[int, int]:
    """step -> reward queries so far, from a run's metrics.jsonl (ValueError naming the file when it
    is missing, malformed or has none)."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (the run folder's metrics give each step's reward queries)")
    try:
        rows = read_metrics(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON lines ({err})") from None
    out = {
        int(row["step"]): int(row["reward_queries"])
        for row in rows
        if "step" in row and "reward_queries" in row
    }
    if not out:
        raise ValueError(f"{path}: no line has both 'step' and 'reward_queries'")
    return out


def standardised_change(values: list[float], base: list[float]) -> float:
    """mean(values - base) / sd(values - base) over the paired samples: 0 when nothing changed (the
    base against itself), NaN when every sample changed by the same amount (no spread to divide by)."""
    delta = np.asarray(values, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    spread = float(delta.std(ddof=1)) if delta.size > 1 else 0.0
    if spread == 0.0:
        return 0.0 if not delta.any() else float("nan")
    return float(delta.mean()) / spread


def run_points(report_path: Path) -> dict:
    """One report's points as columns: reward queries, d, and each reward's paired change from the
    base (mean, 95% interval); the proxy's also standardised (`standardised_change`)."""
    report = json.loads(report_path.read_text())
    if "points" not in report or "run_dir" not in report:
        raise ValueError(f"{report_path}: not a `diffalign overopt` report (no points or run_dir)")
    points = report["points"]
    if any("vs_base" not in p or "values" not in p for p in points):
        raise ValueError(f"{report_path}: its points carry no per-sample values (rerun `diffalign overopt`)")
    queries = reward_queries_by_step(metrics_file(report_path, report["run_dir"]))
    missing = [p["step"] for p in points if p["step"] and p["step"] not in queries]
    if missing:
        raise ValueError(f"{report_path}: steps {missing} are not in the run's metrics.jsonl")
    base_proxy = points[0]["values"]["proxy"]
    names = list(points[0]["vs_base"])
    columns: dict = {
        "queries": [queries.get(p["step"], 0) for p in points],
        "steps": [p["step"] for p in points],
        "d": [p["d"] for p in points],
        "proxy_dz": [standardised_change(p["values"]["proxy"], base_proxy) for p in points],
    }
    for name in names:
        columns[name] = {
            "mean": [p["vs_base"][name]["mean"] for p in points],
            "low": [p["vs_base"][name]["ci95"][0] for p in points],
            "high": [p["vs_base"][name]["ci95"][1] for p in points],
        }
    columns["names"] = names
    columns["rewards"] = report.get("rewards", {})
    columns["base_values"] = points[0]["values"] if points[0]["step"] == 0 else None
    return columns


def join_reports(parts: list[tuple[Path, dict]]) -> dict:
    """One series from several reports of the same run and base point (a run judged again at later
    checkpoints with `diffalign overopt --base-from`): the points of all, ordered by step. Refused,
    naming the reports, when their base points differ (another measurement) or a step is in two."""
    (first_path, first), *rest = parts
    steps = set(first["steps"])
    for path, columns in rest:
        if columns["base_values"] != first["base_values"] or columns["names"] != first["names"]:
            raise ValueError(
                f"{path} and {first_path} share a label but not their base point: they were not measured "
                "on the same samples (use `diffalign overopt --base-from` for the later checkpoints)"
            )
        twice = steps & {s for s in columns["steps"] if s}
        if twice:
            raise ValueError(
                f"{path} and an earlier report with its label both measure steps {sorted(twice)}"
            )
        steps |= set(columns["steps"])
    rows = sorted(
        ((path, columns, i) for path, columns in parts for i, s in enumerate(columns["steps"])),
        key=lambda row: row[1]["steps"][row[2]],
    )
    seen_base = False
    keep = []
    for row in rows:
        if row[1]["steps"][row[2]] == 0:
            if seen_base:
                continue
            seen_base = True
        keep.append(row)
    out = dict(first)
    for key in ("queries", "steps", "d", "proxy_dz"):
        out[key] = [columns[key][i] for _, columns, i in keep]
    for name in first["names"]:
        out[name] = {
            part: [columns[name][part][i] for _, columns, i in keep] for part in ("mean", "low", "high")
        }
    return out


def _trained_only(columns: dict) -> dict:
    """The columns without the points at 0 reward queries (the base model), for a log axis."""
    keep = [i for i, q in enumerate(columns["queries"]) if q > 0]
    out = dict(columns)
    for key in ("queries", "steps", "d", "proxy_dz"):
        out[key] = [columns[key][i] for i in keep]
    for name in columns["names"]:
        out[name] = {part: [columns[name][part][i] for i in keep] for part in ("mean", "low", "high")}
    return out


def overopt_panels(runs: list[tuple[str, dict]], log_queries: bool = False) -> list[Panel]:
    """The proxy panel, the gold panel and one per extra reward, every run a series (reward queries on
    a log axis, the base points left out, with `log_queries`)."""
    xscale = "log" if log_queries else "linear"
    if log_queries:
        runs = [(label, _trained_only(columns)) for label, columns in runs]
    proxy = Panel(
        "proxy (the optimised reward)", "reward queries", "paired change / its sd (d_z)", xscale=xscale
    )
    gold_name = next(iter(runs))[1]["rewards"].get("gold", "gold")
    gold = Panel(f"gold: {gold_name}", "reward queries", "change from base, 95% CI", xscale=xscale)
    extras: dict[str, Panel] = {}
    for label, columns in runs:
        proxy.series.append(Series(label, columns["queries"], columns["proxy_dz"]))
        for name in columns["names"]:
            if name == "proxy":
                continue
            if name == "gold":
                panel = gold
            else:
                panel = extras.setdefault(
                    name, Panel(f"also: {name}", "reward queries", "change from base, 95% CI", xscale=xscale)
                )
            entry = columns[name]
            panel.series.append(
                Series(label, columns["queries"], entry["mean"], lower=entry["low"], upper=entry["high"])
            )
    for panel in (proxy, gold, *extras.values()):
        panel.references.append((0.0, "base"))
    return [proxy, gold, *extras.values()]


def markdown_table(runs: list[tuple[str, dict]]) -> str:
    """One row per checkpoint: reward queries, d = sqrt(KL), the proxy's standardised change and its
    change in its own units, every other reward's change with its interval."""
    names = [n for n in runs[0][1]["names"] if n != "proxy"]
    head = ["run", "step", "reward queries", "sqrt KL", "proxy d_z", "proxy change", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, columns in runs:
        for i, step in enumerate(columns["steps"]):
            cells = [label, str(step), f"{columns['queries'][i]:,}", f"{columns['d'][i]:.1f}"]
            cells.append(f"{columns['proxy_dz'][i]:+.2f}")
            cells.append(f"{columns['proxy']['mean'][i]:+.3f}")
            for name in names:
                entry = columns.get(name)
                if entry is None:
                    cells.append("-")
                    continue
                cells.append(f"{entry['mean'][i]:+.3f} [{entry['low'][i]:+.3f}, {entry['high'][i]:+.3f}]")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="overopt.json files of `diffalign overopt`")
    parser.add_argument("--label", action="append", default=None, help="a legend label per report")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--log-queries", action="store_true", help="reward queries on a log axis")
    args = parser.parse_args()
    labels = args.label or [path.parent.parent.name for path in args.reports]
    if len(labels) != len(args.reports):
        parser.error(f"{len(labels)} --label for {len(args.reports)} reports")
    grouped: dict[str, list[tuple[Path, dict]]] = {}
    for label, path in zip(labels, args.reports):
        grouped.setdefault(label, []).append((path, run_points(path)))
    try:
        runs = [(label, join_reports(parts)) for label, parts in grouped.items()]
    except ValueError as err:
        parser.error(str(err))
    save_figure(line_panels(overopt_panels(runs, args.log_queries)), args.out)
    print(markdown_table(runs))


if __name__ == "__main__":
    main()
