"""Find a diffusers pipeline on this machine and wrap it in the adapter for its family.

`--model PATH_OR_ID` names either a local pipeline folder (holding `model_index.json`) or a Hugging
Face repository id already in the local cache (`HF_HUB_CACHE` / `HF_HOME`). Nothing is ever
downloaded: every lookup passes `local_files_only=True`, whatever `HF_HUB_OFFLINE` says, and a model
that is not on disk is an error naming it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from diffalign.models.diffusers_adapters.common import AdapterConfig, DamagedPipelineError, DiffusersAdapter
from diffalign.models.diffusers_adapters.sd import StableDiffusionAdapter
from diffalign.models.diffusers_adapters.sd3 import StableDiffusion3Adapter
from diffalign.models.diffusers_adapters.sdxl import StableDiffusionXLAdapter

PIPELINE_FILE = "model_index.json"

#: Pipeline class (model_index.json's `_class_name`) -> adapter.
ADAPTERS: dict[str, type[DiffusersAdapter]] = {
    "StableDiffusionPipeline": StableDiffusionAdapter,
    "StableDiffusionXLPipeline": StableDiffusionXLAdapter,
    "StableDiffusion3Pipeline": StableDiffusion3Adapter,
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class UnsupportedPipelineError(ValueError):
    """A diffusers pipeline of a family without an adapter."""


def is_pipeline_folder(path: Path) -> bool:
    """Whether `path` is a diffusers pipeline folder (holds model_index.json)."""
    return (path / PIPELINE_FILE).is_file()


def looks_like_repo_id(spec: str) -> bool:
    """Whether `spec` has the form of a Hugging Face repository id ("owner/name")."""
    return bool(_REPO_ID.match(spec))


def cached_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a cached Hugging Face repository (no network).

    Raises FileNotFoundError naming the id and the cache folder when it is not cached.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError) as error:
        raise FileNotFoundError(
            f"--model {repo_id!r}: no such folder, and no snapshot of the Hugging Face repository "
            f"{repo_id!r} in the local cache ({constants.HF_HUB_CACHE}); nothing is downloaded, so "
            f"fetch it first (e.g. `hf download {repo_id}`) or pass a local pipeline folder"
        ) from error
    if not is_pipeline_folder(folder):
        raise FileNotFoundError(f"--model {repo_id!r}: the cached snapshot {folder} has no {PIPELINE_FILE}")
    return folder


def pipeline_class_name(folder: Path) -> str:
    """The pipeline class a folder was saved from (model_index.json's `_class_name`)."""
    try:
        return str(json.loads((folder / PIPELINE_FILE).read_text())["_class_name"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamagedPipelineError(
            f"{folder / PIPELINE_FILE}: not a readable diffusers model index ({error!r})"
        ) from error


def adapter_class(folder: Path) -> type[DiffusersAdapter]:
    """The adapter for the pipeline in `folder`; UnsupportedPipelineError names the class otherwise."""
    name = pipeline_class_name(folder)
    if name not in ADAPTERS:
        raise UnsupportedPipelineError(
            f"{folder}: {name} pipelines have no adapter; supported: {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[name]


def check_component_folders(folder: Path, skip: tuple[str, ...] = ()) -> None:
    """Refuse a pipeline folder whose model_index.json names a component with no subfolder of that name
    (diffusers' own error would not say which component is missing); components in `skip` are not loaded
    (SD's safety checker) and may be absent."""
    index = json.loads((folder / PIPELINE_FILE).read_text())
    missing = [
        f"{name} ({entry[1]})"
        for name, entry in index.items()
        if not name.startswith("_")
        and name not in skip
        and isinstance(entry, list)
        and len(entry) == 2
        and entry[1] is not None
        and not (folder / name).is_dir()
    ]
    if missing:
        raise DamagedPipelineError(
            f"{folder}: {PIPELINE_FILE} names components with no subfolder: {', '.join(missing)}"
        )


def pipeline_resolution(folder: str | Path, config: AdapterConfig | None = None) -> int:
    """The image size (pixels per side) the adapter of `folder` will work at, read from the component
    configs without loading weights: `config.resolution`, else the denoiser's `sample_size` times the
    VAE's downsampling factor (as `DiffusersAdapter` computes it)."""
    folder = Path(folder)
    if config is not None and config.resolution:
        return int(config.resolution)
    cls = adapter_class(folder)
    try:
        denoiser = json.loads((folder / cls.denoiser_name / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(denoiser["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamagedPipelineError(
            f"{folder}: cannot read the denoiser's or the VAE's config ({error})"
        ) from error


def load_adapter(
    folder: str | Path, device: torch.device | str = "cpu", config: AdapterConfig | None = None
) -> DiffusersAdapter:
    """Load the pipeline in `folder` (local files only) and wrap it; the denoiser is in eval mode."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not is_pipeline_folder(folder):
        raise FileNotFoundError(f"{folder}: not a diffusers pipeline folder (no {PIPELINE_FILE})")
    cls = adapter_class(folder)
    check_component_folders(folder, skip=tuple(cls.load_overrides))
    config = config or AdapterConfig()
    from safetensors import SafetensorError

    try:
        pipeline = DiffusionPipeline.from_pretrained(
            folder, local_files_only=True, dtype=config.torch_dtype, **cls.load_overrides
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as error:
        raise DamagedPipelineError(
            f"{folder}: cannot load the {pipeline_class_name(folder)}: {error}"
        ) from error
    missing = [name for name in cls.required_components if getattr(pipeline, name, None) is None]
    if missing:
        raise DamagedPipelineError(
            f"{folder}: the pipeline has no {', '.join(missing)} (model_index.json names none, or its folder "
            f"is empty); a {pipeline_class_name(folder)} needs {', '.join(cls.required_components)}"
        )
    pipeline.set_progress_bar_config(disable=True)
    return cls(pipeline, config, device=device)
