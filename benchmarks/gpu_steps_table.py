"""One markdown table from several `benchmarks/gpu_steps.py` results files (the runs of
`benchmarks/gpu_steps_suite.sh`, say), each row naming the levers its diffalign variant used where
they differ from the script's defaults for that device.

    python benchmarks/gpu_steps_table.py benchmarks/results/gpu_steps/h200-*.json

Every measured (step, fine-tuning, batch) of every file is a row: a diffalign record with the eager
record of the same file (the baseline measured in that process), or an eager record alone when its
run stopped before the diffalign variant was measured. Rows from files whose run was stopped part
way (`complete` false) are marked so.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_steps, beside this script


@functools.cache
def cuda_default_levers() -> dict:
    """The diffalign variant's levers on CUDA when no lever flag is given (`gpu_steps.diffalign_levers`,
    derived rather than copied, so the table follows the benchmark's defaults)."""
    import torch

    from gpu_steps import diffalign_levers, parser

    return asdict(diffalign_levers(parser().parse_args([]), torch.device("cuda")))


def lever_changes(levers: dict) -> str:
    """The levers that differ from the CUDA defaults, as `name=value`, or "defaults"."""
    defaults = cuda_default_levers()
    changed = [f"{k}={v}" for k, v in levers.items() if defaults.get(k, v) != v]
    return ", ".join(changed) or "defaults"


def rows_of(path: Path) -> list[dict]:
    """The table rows of one results file; SystemExit naming the file when it is not one."""
    try:
        return _rows(path, json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise SystemExit(f"{path}: not a benchmarks/gpu_steps.py results file ({error!r})") from error


def _rows(path: Path, results: dict) -> list[dict]:
    records = results["records"]
    levers = results["config"]["levers"]["diffalign"]
    run = path.stem + ("" if results.get("complete", True) else " (stopped part way)")
    eager = {(r["finetune"], r["step"], r["batch"]): r for r in records if r["variant"] == "eager"}
    diffalign = {(r["finetune"], r["step"], r["batch"]): r for r in records if r["variant"] == "diffalign"}
    rows = []
    for key, base in eager.items():
        finetune, step, batch = key
        row = {"run": run, "step": step, "finetune": finetune, "batch": batch, "eager": base}
        ours = diffalign.get(key)
        if ours is not None:
            row.update(diffalign=ours, levers=lever_changes(levers), speedup=base["ms"] / ours["ms"])
        rows.append(row)
    for key, ours in diffalign.items():
        if key not in eager:
            finetune, step, batch = key
            rows.append(
                {"run": run, "step": step, "finetune": finetune, "batch": batch, "diffalign": ours}
                | {"levers": lever_changes(levers)}
            )
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(record: dict | None, key: str, fmt: str) -> str:
        if record is None or record.get(key) is None:
            return "-"
        return format(record[key], fmt)

    lines = [
        "| run | step | tuning | B | diffalign levers | eager ms | diffalign ms | speed-up | eager GiB "
        "| diffalign GiB | eager TFLOP/s | diffalign TFLOP/s | first call s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        e, d = row.get("eager"), row.get("diffalign")
        speedup = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
        lines.append(
            f"| {row['run']} | {row['step']} | {row['finetune']} | {row['batch']} | {row.get('levers', '-')} "
            f"| {cell(e, 'ms', '.1f')} | {cell(d, 'ms', '.1f')} | {speedup} | {cell(e, 'peak_gib', '.1f')} "
            f"| {cell(d, 'peak_gib', '.1f')} | {cell(e, 'tflops', '.0f')} | {cell(d, 'tflops', '.0f')} "
            f"| {cell(d, 'first_call_s', '.0f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of gpu_steps.py")
    args = parser.parse_args(argv)
    table = markdown([row for path in args.results for row in rows_of(path)])
    print(table)
    return table


if __name__ == "__main__":
    main()
