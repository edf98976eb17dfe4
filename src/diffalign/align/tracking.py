"""Metrics: a JSONL file in the run folder, Accelerate's trackers, and a progress bar.

- `metrics.jsonl`: one JSON object per logged step (always written, by the main process). On resume
  from the checkpoint of step k, lines with step > k are dropped first, so the file of an interrupted
  and resumed run equals the file of an uninterrupted run. The file is strict JSON: a value that is
  not a finite number (the diversity of a batch with no repeated prompt is undefined) is written as
  `null`, which every JSON reader accepts (Python's `NaN` token is not JSON).
- Accelerate trackers (`Accelerator(log_with=...)`): `resolve_log_with("auto")` is TensorBoard when it
  is installed (events under RUN_DIR/logs), "wandb" and "mlflow" are passed through (configure them the
  usual way, e.g. WANDB_PROJECT), "none" disables them; several may be given comma-separated.
- A rich progress bar on the main process (off when `show_progress` is False, e.g. in tests).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

KNOWN_TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


def resolve_log_with(log_with: str) -> list[str] | None:
    """The `log_with` list for `Accelerator` from a config value ("auto", "none", "tensorboard,wandb")."""
    if log_with in ("none", ""):
        return None
    if log_with == "auto":
        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            return ["tensorboard"]
        return None
    names = [n.strip() for n in log_with.split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN_TRACKERS]
    if unknown:
        raise ValueError(f"log_with: unknown tracker(s) {unknown}; expected auto, none or {KNOWN_TRACKERS}")
    return names


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of `path` whose step is after `step` (what a run resumed from `step` re-logs)."""
    if not path.is_file():
        return
    kept = [
        line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def json_line(record: dict) -> str:
    """`record` as one line of strict JSON: floats that are NaN or infinite, at any depth, become null."""

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(record), allow_nan=False)


def _flat_hparams(record: dict, prefix: str = "") -> dict:
    """Tracker-friendly config: nested keys dotted, values int/float/str/bool (others as text)."""
    out: dict = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = json.dumps(value)
    return out


class Tracker:
    """Writes every metrics record to metrics.jsonl, the Accelerate trackers and the progress bar."""

    def __init__(
        self,
        accelerator,
        metrics_path: Path,
        *,
        project: str,
        record: dict,
        total_steps: int,
        start_step: int,
        show_progress: bool = False,
    ) -> None:
        self.accelerator = accelerator
        self.metrics_path = metrics_path
        self.main = accelerator.is_main_process
        if self.main:
            truncate_metrics(metrics_path, start_step)
        if accelerator.log_with:
            accelerator.init_trackers(project, config=_flat_hparams(record))
        self.progress = None
        if self.main and show_progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.task = self.progress.add_task(project, total=total_steps, completed=start_step, info="")
            self.progress.start()

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def log(self, record: dict) -> None:
        """One metrics record (must hold "step"): the JSONL line, the trackers, the bar's text."""
        if self.main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json_line(record) + "\n")
            if self.progress is not None:
                shown = [
                    f"{k} {v:.4g}"
                    for k, v in record.items()
                    if k in ("loss", "implicit_acc") and v is not None
                ]
                self.progress.update(self.task, completed=record["step"], info="  ".join(shown))
        if self.accelerator.log_with:
            scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
            self.accelerator.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.accelerator.log_with:
            self.accelerator.end_training()
