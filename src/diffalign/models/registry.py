"""Resolve a `--model` argument to a `DiffusionModel`.

Accepted forms:
- `base` / `base-flow`: the tiny Shapes-world models shipped inside the package (epsilon / flow);
- a tiny-model folder (holding `diffalign_model.json`), or a run folder whose `model/` subfolder
  is one (what `diffalign pretrain` and every trainer write at the end);
- a checkpoint of a trainer's run (`RUN_DIR/checkpoints/step-N`): the run's base model with that
  checkpoint's trainable weights (`diffalign.align.run_checkpoints`), LoRA adapters merged as in the
  run's `model/`, e.g. the step `diffalign overopt` says to stop at;
- a diffusers pipeline folder (holding `model_index.json`; also as a run's `model/`), or the id of a
  Hugging Face repository in the local cache (no download): Stable Diffusion 1.x/2.x, XL and 3,
  wrapped by `diffalign.models.diffusers_adapters` (imported only when such a model is named).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from diffalign.models.tiny import MODEL_FILE, TinyDiffusionModel

BUILTIN = {"base": "base", "base-flow": "base-flow"}


class UnsupportedModelError(ValueError):
    """A model this release cannot load: a diffusers pipeline without an adapter or with a scheduler
    option our schedules cannot express, or a damaged model folder (`DamagedModelError`)."""


class DamagedModelError(UnsupportedModelError):
    """A model folder (or a run's checkpoint) whose files are missing, unreadable, corrupt or do not fit
    together (a config of another architecture, weights of another shape)."""


#: What reading a damaged model folder raises (json, safetensors, diffusers and torch errors).
_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, TypeError, KeyError)


PIPELINE_FILE = "model_index.json"  # a diffusers pipeline folder


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("diffalign.models") / "weights" / BUILTIN[name]))


def expand_spec(spec: str) -> str:
    """`spec` with a leading `~` expanded to the home folder (a shell leaves `--model=~/x` as written)."""
    return str(Path(spec).expanduser()) if spec.startswith("~") else spec


def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (*_LOAD_ERRORS, SafetensorError)


def resolve_model_folder(spec: str) -> Path:
    """The folder holding the model named by `spec` (see module doc); errors say what was expected."""
    spec = expand_spec(spec)
    if spec in BUILTIN:
        folder = builtin_path(spec)
        if not (folder / MODEL_FILE).is_file():
            raise FileNotFoundError(
                f"the built-in model {spec!r} is missing from the installation ({folder})"
            )
        return folder
    path = Path(spec)
    if not path.exists():
        from diffalign.models.diffusers_adapters.loading import cached_snapshot, looks_like_repo_id

        if looks_like_repo_id(spec):
            return cached_snapshot(spec)  # FileNotFoundError naming the id and the cache when absent
        raise FileNotFoundError(
            f"--model {spec!r}: no such folder; expected 'base', 'base-flow', a model folder, a run folder, "
            "a run's checkpoint folder, a diffusers pipeline folder or a Hugging Face id in the local cache"
        )
    for folder in (path, path / "model"):
        if (folder / MODEL_FILE).is_file() or (folder / PIPELINE_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"--model {spec!r}: no {MODEL_FILE} or {PIPELINE_FILE} in it or in its model/ subfolder, and it "
        f"is not a run's checkpoint (RUN_DIR/checkpoints/step-N){_run_without_model_hint(path)}"
    )


def _run_without_model_hint(path: Path) -> str:
    """For a run folder that has checkpoints but no final model/ (an unfinished or interrupted run): a
    sentence naming its latest checkpoint, which `--model` accepts; else ''."""
    if not path.is_dir():
        return ""
    from diffalign.align.run_checkpoints import list_checkpoints

    try:
        found = list_checkpoints(path)
    except _LOAD_ERRORS:
        return ""
    if not found:
        return ""
    return f"; it is a run without a final model/, whose latest checkpoint is {found[-1][1]}"


def checkpoint_of_run(spec: str) -> Path | None:
    """The run folder when `spec` names one of its checkpoints (RUN_DIR/checkpoints/step-N), else None."""
    if spec in BUILTIN:
        return None
    from diffalign.align.run_checkpoints import checkpoint_run_dir

    return checkpoint_run_dir(expand_spec(spec))


def _checkpoint_base(spec: str, diffusers_options) -> tuple[dict, object] | None:
    """For a run's checkpoint: the run's `run_base` record and the pipeline options to load its base
    with (the caller's when given, else the run's); None when `spec` is not a checkpoint."""
    run_dir = checkpoint_of_run(spec)
    if run_dir is None:
        return None
    from diffalign.align.run_checkpoints import run_base

    try:
        info = run_base(run_dir)
    except _LOAD_ERRORS as error:
        raise DamagedModelError(f"--model {spec!r} (a checkpoint of the run {run_dir}): {error}") from error
    return info, info["pipeline"] if diffusers_options is None else diffusers_options


def load_model(spec: str, device: torch.device | str = "cpu", diffusers_options=None):
    """Load the model named by `spec` onto `device`, in eval mode: a `TinyDiffusionModel`, or a
    diffusers adapter (`diffusers_options`: an `AdapterConfig` with its dtype and memory options; for a
    run's checkpoint, the run's own options unless these are given)."""
    spec = expand_spec(spec)
    checkpoint = _checkpoint_base(spec, diffusers_options)
    if checkpoint is not None:
        from diffalign.align.run_checkpoints import load_checkpoint_model

        info, options = checkpoint
        try:
            model = load_checkpoint_model(
                info["model"], Path(spec), info["lora_rank"], info["lora_alpha"], device, options
            )
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--model {spec!r}: the base model of its run: {error}") from error
        except UnsupportedModelError as error:
            raise type(error)(f"--model {spec!r}: the base model of its run: {error}") from error
        except _load_errors() as error:
            raise DamagedModelError(f"--model {spec!r}: cannot load this checkpoint: {error}") from error
        if model.lora:
            model.merge_lora()  # a plain model, as the run's model/ folder is
        model.denoiser.eval()
        return model
    folder = resolve_model_folder(spec)
    if (folder / PIPELINE_FILE).is_file():
        from diffalign.models.diffusers_adapters.loading import (
            DamagedPipelineError,
            UnsupportedPipelineError,
            load_adapter,
        )
        from diffalign.models.diffusers_adapters.scheduling import UnsupportedScheduleError

        try:
            return load_adapter(folder, device=device, config=diffusers_options)
        except DamagedPipelineError as error:
            raise DamagedModelError(f"--model {spec!r}: {error}") from error
        except (UnsupportedPipelineError, UnsupportedScheduleError) as error:
            raise UnsupportedModelError(f"--model {spec!r}: {error}") from error
    model = _load_tiny(spec, folder, device)
    model.unet.eval()
    return model


def _load_tiny(spec: str, folder: Path, device: torch.device | str = "cpu") -> TinyDiffusionModel:
    """`TinyDiffusionModel.load`, a damaged folder's errors as a `DamagedModelError` naming `spec`."""
    try:
        return TinyDiffusionModel.load(folder, device=device)
    except _load_errors() as error:
        where = "" if str(folder) in str(error) else f"cannot load the model folder {folder}: "
        raise DamagedModelError(f"--model {spec!r}: {where}{error}") from error


def model_image_size(spec: str, diffusers_options=None) -> int:
    """Pixels per side of the images the model named by `spec` generates and trains on (a preference
    store's pairs are read at this size), without loading a pipeline's weights."""
    spec = expand_spec(spec)
    checkpoint = _checkpoint_base(spec, diffusers_options)
    if checkpoint is not None:
        info, options = checkpoint
        return model_image_size(info["model"], options)
    folder = resolve_model_folder(spec)
    if (folder / PIPELINE_FILE).is_file():
        from diffalign.models.diffusers_adapters.loading import pipeline_resolution

        return pipeline_resolution(folder, diffusers_options)
    return int(_load_tiny(spec, folder).latent_shape[-1])
