"""A run's checkpoints as models: `diffalign eval|sample --model RUN_DIR/checkpoints/step-N`.

A trainer's run folder (`run_dir.py`) keeps resumable checkpoints, each holding only the trainable
weights (the whole denoiser, or its LoRA adapters). Here they are turned back into models:
- `run_base` reads the run's base model, KL reference, LoRA and pipeline settings from its record;
- `list_checkpoints` lists the finished checkpoints by step;
- `load_checkpoint_model` loads the base model and applies a checkpoint's weights to its denoiser;
- `checkpoint_run_dir` tells whether a path is such a checkpoint (what `models.registry.load_model`
  uses, so every `--model` accepts one, e.g. the step `diffalign overopt` says to stop at).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffalign.align.run_dir import CHECKPOINTS, CONFIG_FILE, STATE_FILE, WEIGHTS_FILE


def checkpoint_run_dir(path: str | Path) -> Path | None:
    """RUN_DIR when `path` is a finished checkpoint of a run (RUN_DIR/checkpoints/step-N holding
    weights and a state record, RUN_DIR holding the run record), else None."""
    path = Path(path)
    run_dir = path.parent.parent
    if (
        path.parent.name == CHECKPOINTS
        and (path / WEIGHTS_FILE).is_file()
        and (path / STATE_FILE).is_file()
        and (run_dir / CONFIG_FILE).is_file()
    ):
        return run_dir
    return None


def run_base(run_dir: str | Path) -> dict:
    """The run's base model spec and LoRA settings from RUN_DIR/config.json.

    Returns {"model": spec, "reference": spec of the KL reference, "lora_rank", "lora_alpha",
    "pipeline": the diffusers options (a dict, empty for older runs), "guidance_scale": the guidance
    the run sampled with (None for a trainer that does not sample, e.g. offline DPO)}; the reference is
    the config's `reference` when set (DPO against an earlier iterate), else the model.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run folder ({CONFIG_FILE} is missing)")
    record = json.loads(path.read_text(encoding="utf-8"))
    config = record.get("config", {})
    if "model" not in config:
        raise ValueError(f"{path}: the run record has no config.model")
    return {
        "model": config["model"],
        "reference": config.get("reference") or config["model"],
        "lora_rank": int(config.get("lora_rank", 0) or 0),
        "lora_alpha": float(config.get("lora_alpha", 0.0) or 0.0),
        "pipeline": dict(config.get("pipeline") or {}),
        "guidance_scale": None if config.get("guidance_scale") is None else float(config["guidance_scale"]),
    }


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint under RUN_DIR/checkpoints, by step."""
    folder = Path(run_dir) / CHECKPOINTS
    found = []
    for path in sorted(folder.glob("step-*")) if folder.is_dir() else []:
        state = path / STATE_FILE
        if state.is_file():
            found.append((int(json.loads(state.read_text(encoding="utf-8"))["step"]), path))
    return sorted(found)


def load_checkpoint_model(
    spec: str,
    checkpoint: Path,
    lora_rank: int = 0,
    lora_alpha: float = 0.0,
    device="cpu",
    pipeline=None,
):
    """The base model `spec` (a tiny model or a diffusers pipeline, with the run's `pipeline` options:
    a dict as the run record holds them, or an `AdapterConfig`) with the checkpoint's trainable weights
    applied to its denoiser (LoRA adapters when `lora_rank` > 0). Its reference is not fixed: the model
    is for sampling and scoring."""
    from safetensors.torch import load_file

    from diffalign.align.policy_setup import adapter_options, load_policy

    model = load_policy(
        spec,
        device,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        pipeline=adapter_options(pipeline or {}),
        fix_reference=False,
    )
    weights = load_file(str(checkpoint / WEIGHTS_FILE), device=str(device))
    own = set(model.denoiser.state_dict())
    unknown = sorted(set(weights) - own)
    if unknown:
        raise ValueError(f"{checkpoint / WEIGHTS_FILE}: weights not in the model: {unknown[:5]}")
    model.denoiser.load_state_dict(weights, strict=False)
    model.denoiser.eval()
    return model
