"""Resolve a `--model` argument to a `DiffusionModel`.

Accepted forms:
- `base` / `base-flow`: the tiny Shapes-world models shipped inside the package (epsilon / flow);
- a tiny-model folder (holding `diffalign_model.json`), or a run folder whose `model/` subfolder
  is one (what `diffalign pretrain` writes).
Diffusers pipelines (Stable Diffusion and SD3 families) plug in through the same interface; their
adapters are not part of this release, and a pipeline folder is refused with a message saying so.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from diffalign.models.tiny import MODEL_FILE, TinyDiffusionModel

BUILTIN = {"base": "base", "base-flow": "base-flow"}


class UnsupportedModelError(ValueError):
    """A model folder of a kind this release cannot load (a diffusers pipeline)."""


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("diffalign.models") / "weights" / BUILTIN[name]))


def resolve_model_folder(spec: str) -> Path:
    """The folder holding the model named by `spec` (see module doc); errors say what was expected."""
    if spec in BUILTIN:
        folder = builtin_path(spec)
        if not (folder / MODEL_FILE).is_file():
            raise FileNotFoundError(
                f"the built-in model {spec!r} is missing from the installation ({folder})"
            )
        return folder
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"--model {spec!r}: no such folder; expected 'base', 'base-flow', a model folder or a run folder"
        )
    if (path / MODEL_FILE).is_file():
        return path
    if (path / "model" / MODEL_FILE).is_file():
        return path / "model"
    if (path / "model_index.json").is_file():
        raise UnsupportedModelError(
            f"--model {spec!r} is a diffusers pipeline; diffusers adapters are not part of this release"
        )
    raise FileNotFoundError(f"--model {spec!r}: no {MODEL_FILE} in it or in its model/ subfolder")


def load_model(spec: str, device: torch.device | str = "cpu") -> TinyDiffusionModel:
    """Load the model named by `spec` onto `device`, in eval mode."""
    model = TinyDiffusionModel.load(resolve_model_folder(spec), device=device)
    model.unet.eval()
    return model
