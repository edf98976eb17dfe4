"""Resolve a `--model` argument to a `DiffusionModel`.

Accepted forms:
- `base` / `base-flow`: the tiny Shapes-world models shipped inside the package (epsilon / flow);
- a tiny-model folder (holding `diffalign_model.json`), or a run folder whose `model/` subfolder
  is one (what `diffalign pretrain` writes);
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
    """A model folder of a kind this release cannot load (a diffusers pipeline without an adapter)."""


PIPELINE_FILE = "model_index.json"  # a diffusers pipeline folder


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
        from diffalign.models.diffusers_adapters.loading import cached_snapshot, looks_like_repo_id

        if looks_like_repo_id(spec):
            return cached_snapshot(spec)  # FileNotFoundError naming the id and the cache when absent
        raise FileNotFoundError(
            f"--model {spec!r}: no such folder; expected 'base', 'base-flow', a model folder, a run folder, "
            "a diffusers pipeline folder or a Hugging Face id in the local cache"
        )
    for folder in (path, path / "model"):
        if (folder / MODEL_FILE).is_file() or (folder / PIPELINE_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"--model {spec!r}: no {MODEL_FILE} or {PIPELINE_FILE} in it or in its model/ subfolder"
    )


def load_model(spec: str, device: torch.device | str = "cpu", diffusers_options=None):
    """Load the model named by `spec` onto `device`, in eval mode: a `TinyDiffusionModel`, or a
    diffusers adapter (`diffusers_options`: an `AdapterConfig` with its dtype and memory options)."""
    folder = resolve_model_folder(spec)
    if (folder / PIPELINE_FILE).is_file():
        from diffalign.models.diffusers_adapters.loading import UnsupportedPipelineError, load_adapter

        try:
            return load_adapter(folder, device=device, config=diffusers_options)
        except UnsupportedPipelineError as error:
            raise UnsupportedModelError(f"--model {spec!r}: {error}") from error
    model = TinyDiffusionModel.load(folder, device=device)
    model.unet.eval()
    return model


def model_image_size(spec: str, diffusers_options=None) -> int:
    """Pixels per side of the images the model named by `spec` generates and trains on (a preference
    store's pairs are read at this size), without loading a pipeline's weights."""
    folder = resolve_model_folder(spec)
    if (folder / PIPELINE_FILE).is_file():
        from diffalign.models.diffusers_adapters.loading import pipeline_resolution

        return pipeline_resolution(folder, diffusers_options)
    return int(TinyDiffusionModel.load(folder).latent_shape[-1])
