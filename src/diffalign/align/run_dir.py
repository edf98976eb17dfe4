"""The run folder every trainer writes, and its checkpoints.

```
RUN_DIR/
  config.json                    the trainer config + the model / reward / data specs (`run_record`)
  metrics.jsonl                  one JSON object per logged step (see tracking.py)
  checkpoints/step-0000100/      a resumable checkpoint (the last `keep` are kept)
    weights.safetensors          the trainable weights (all of them, or the LoRA adapters only)
    optimizer.pt                 the optimiser state
    state.json                   step, data cursor, the run record, trainer extras (metric sums, ...)
    process-0.pt, process-1.pt   per process: torch RNG states (CPU, and CUDA if used) and the
                                 trainer's per-process state (e.g. metric sums since the last log)
  model/                         the final model (`TinyDiffusionModel.save`), so `load_model(RUN_DIR)`
                                 and `diffalign sample|eval --model RUN_DIR` work (a checkpoint
                                 folder works too: `run_checkpoints.py`)
  logs/                          Accelerate trackers (TensorBoard events, ...)
```

A checkpoint is written to a hidden temporary folder and renamed into place, so a crash never leaves a
half-written checkpoint under a final name. Loading compares the checkpoint's run record with the
current one and refuses a different config, naming the differing keys. Only the main process writes
files; every process writes its own RNG and per-process state.

Extending a run (`--extend`) is a resume that may change one thing: the run's length (`LENGTH_KEYS`), to
no fewer steps than its latest checkpoint holds. Every trainer's schedule (learning-rate warm-up, data
order, prompts, noise, SDE windows) is a function of the step alone, so an extended run trains exactly as
one started with the longer length; only its metrics log has one more line where the shorter run ended
(that run's closing line). A completed run's `model/` is moved aside to `model-step-N/` (N: its old
length), so `model/` never holds a model the run record does not describe.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"

#: Keys of the run record that may change between a run and its resumption (where it runs, how it logs).
RESUMABLE_CHANGES = ("config.runtime.device", "config.log_with")

#: Keys of the run record an extended run (`RunDir.start(..., extend=True)`) may change: the length in
#: epochs (online RL) or optimiser steps (DPO, KTO, reward backprop).
LENGTH_KEYS = ("config.epochs", "config.steps")


class RunDirError(ValueError):
    """The run folder cannot be used as asked (exists without --resume, config mismatch, ...)."""


@dataclass
class Checkpoint:
    """What `RunDir.load_checkpoint` returns.

    Attributes:
        path: the checkpoint folder.
        step: optimiser steps done.
        data_cursor: examples consumed (global count) when the checkpoint was written.
        weights: the trainable weights by parameter name.
        optimizer: the optimiser's state dict.
        rng: this process's RNG states (None when the checkpoint holds none for it).
        process_state: this process's trainer state written by `write_process_state` ({} if none).
        extra: trainer-specific state (JSON).
    """

    path: Path
    step: int
    data_cursor: int
    weights: dict[str, torch.Tensor]
    optimizer: dict
    rng: dict | None
    process_state: dict
    extra: dict


def flatten(record: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists stay values)."""
    if isinstance(record, dict):
        out: dict[str, Any] = {}
        for key, value in record.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: record}


def differing_keys(saved: dict, current: dict, ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """Dotted keys whose values differ between two run records (missing counts as different)."""
    a, b = flatten(saved), flatten(current)
    return sorted(
        k for k in set(a) | set(b) if k not in ignore and a.get(k, "<missing>") != b.get(k, "<missing>")
    )


def run_lengths(record: dict) -> dict[str, Any]:
    """The run record's length keys (`LENGTH_KEYS`) and their values."""
    return {k: v for k, v in flatten(record).items() if k in LENGTH_KEYS}


def rng_state() -> dict:
    """This process's torch RNG states (CPU, and every CUDA device when CUDA is initialised)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunDir:
    """A run folder (see the module doc)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / CONFIG_FILE
        self.metrics_path = self.path / METRICS_FILE
        self.checkpoints = self.path / CHECKPOINTS
        self.model_dir = self.path / MODEL_DIR
        self.logs_dir = self.path / "logs"

    # --- the run record ---------------------------------------------------------------------------

    def start(self, record: dict, resume: bool, write: bool = True, extend: bool = False) -> dict | None:
        """Begin (or resume) the run described by `record` (JSON data).

        A fresh run refuses a folder that already holds a run; a resumed run refuses a folder without
        one, or whose config.json differs from `record` (naming the differing keys). `extend` (implies
        `resume`) also lets the length (`LENGTH_KEYS`) differ, refusing one shorter than the latest
        checkpoint's step; with `write`, a completed run's model folder is moved aside
        (`retire_final_model`). Returns the folder's previous run record (None for a fresh run)."""
        saved = None
        flag = "--extend" if extend else "--resume"
        if resume or extend:
            if not self.config_path.is_file():
                raise RunDirError(f"{flag}: {self.path} holds no run ({CONFIG_FILE} is missing)")
            saved = json.loads(self.config_path.read_text(encoding="utf-8"))
            diff = differing_keys(saved, record, self.ignored_changes(extend))
            if diff:
                hint = "" if extend else " (only the length may change, with --extend)"
                raise RunDirError(
                    f"{flag}: the config differs from the run's {self.config_path} in {diff}; "
                    f"resume with the same config{hint}, or start a new run folder"
                )
            if extend:
                self.check_extension(record)
        elif self.config_path.is_file() or self.latest_checkpoint() is not None:
            raise RunDirError(
                f"{self.path} already holds a run; pass --resume to continue it, or choose another folder"
            )
        if write:
            if extend:
                self.retire_final_model(saved)
            self.write_record(record)
        return saved

    @staticmethod
    def ignored_changes(extend: bool) -> tuple[str, ...]:
        """The run-record keys a resume may change (`RESUMABLE_CHANGES`; an extension: `LENGTH_KEYS` too)."""
        return RESUMABLE_CHANGES + (LENGTH_KEYS if extend else ())

    def check_extension(self, record: dict) -> None:
        """Refuse an extension whose record has no length key, or whose length ends before the latest
        checkpoint (naming both)."""
        lengths = run_lengths(record)
        if not lengths:
            raise RunDirError(f"--extend: this run's record has none of {list(LENGTH_KEYS)} to extend")
        latest = self.latest_checkpoint()
        if latest is None:
            raise RunDirError(f"--extend: no checkpoint under {self.checkpoints}")
        step = int(json.loads((latest / STATE_FILE).read_text(encoding="utf-8"))["step"])
        for key, length in lengths.items():
            if int(length) < step:
                raise RunDirError(
                    f"--extend: {key.removeprefix('config.')}={length} ends before the latest checkpoint "
                    f"{latest.name} (step {step}); extend to {step} or more"
                )

    def retire_final_model(self, saved: dict) -> Path | None:
        """Move a completed run's `model/` to `model-step-N/` (N: its length in `saved`, the old record),
        so `model/` never holds a model of another length; returns the new folder (None if none)."""
        if not self.model_dir.is_dir():
            return None
        lengths = list(run_lengths(saved).values())
        target = self.path / f"{MODEL_DIR}-step-{int(lengths[0]) if lengths else 0:07d}"
        if target.exists():
            raise RunDirError(f"--extend: {target} already exists; move it away to extend {self.path}")
        self.model_dir.rename(target)
        return target

    def write_record(self, record: dict) -> None:
        """Write config.json (main process; after every process's `start(..., write=False)`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")

    # --- checkpoints -------------------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        done = sorted(p for p in self.checkpoints.glob("step-*") if (p / STATE_FILE).is_file())
        return done[-1] if done else None

    def checkpoint_tmp(self, step: int) -> Path:
        return self.checkpoints / f".tmp-step-{step:07d}"

    def begin_checkpoint(self, step: int) -> Path:
        """Create the (empty) temporary folder of step `step`'s checkpoint (main process)."""
        tmp = self.checkpoint_tmp(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    @staticmethod
    def write_process_state(tmp: Path, process_index: int, state: dict | None = None) -> None:
        """Every process writes its RNG states and its own trainer `state` (tensors, numbers) into the
        temporary folder."""
        torch.save({"rng": rng_state(), "state": state or {}}, tmp / f"process-{process_index}.pt")

    def finish_checkpoint(
        self,
        step: int,
        *,
        weights: dict[str, torch.Tensor],
        optimizer: dict,
        data_cursor: int,
        record: dict,
        extra: dict | None = None,
        keep: int = 2,
    ) -> Path:
        """Write weights, optimiser and state into the temporary folder, rename it into place and
        delete all but the last `keep` checkpoints (main process, after every `write_process_state`)."""
        tmp = self.checkpoint_tmp(step)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
        torch.save(optimizer, tmp / OPTIMIZER_FILE)
        state = {"step": step, "data_cursor": data_cursor, "record": record, "extra": extra or {}}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
        final = self.checkpoints / f"step-{step:07d}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic on one file system
        old = sorted(p for p in self.checkpoints.glob("step-*") if p != final)
        for stale in old[: max(0, len(old) - max(0, keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def save_checkpoint(self, step: int, process_state: dict | None = None, **kwargs: Any) -> Path:
        """Single-process convenience: `begin_checkpoint`, `write_process_state`, `finish_checkpoint`."""
        tmp = self.begin_checkpoint(step)
        self.write_process_state(tmp, 0, process_state)
        return self.finish_checkpoint(step, **kwargs)

    def load_checkpoint(
        self,
        path: Path,
        record: dict,
        process_index: int = 0,
        map_location: str | torch.device = "cpu",
        extend: bool = False,
    ) -> Checkpoint:
        """Read a checkpoint, refusing one whose run record differs from `record` (naming the keys;
        `extend`: but for its length)."""
        state_path = path / STATE_FILE
        if not state_path.is_file():
            raise RunDirError(f"{path}: not a checkpoint ({STATE_FILE} is missing)")
        state = json.loads(state_path.read_text(encoding="utf-8"))
        diff = differing_keys(state["record"], record, self.ignored_changes(extend))
        if diff:
            raise RunDirError(f"checkpoint {path} was written with a different config: {diff}")
        process_path = path / f"process-{process_index}.pt"
        process = torch.load(process_path, weights_only=True) if process_path.is_file() else {}
        return Checkpoint(
            path=path,
            step=int(state["step"]),
            data_cursor=int(state["data_cursor"]),
            weights=load_file(str(path / WEIGHTS_FILE), device=str(map_location)),
            optimizer=torch.load(path / OPTIMIZER_FILE, map_location=map_location, weights_only=True),
            rng=process.get("rng"),
            process_state=process.get("state", {}),
            extra=state.get("extra", {}),
        )
