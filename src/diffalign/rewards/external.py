"""External reward models loaded from local weights: shared plumbing and the `load_external_reward` factory.

The models themselves live in `clip_rewards` (CLIP score, PickScore, LAION aesthetic; differentiable, built on
`transformers`) and `package_rewards` (ImageReward, HPSv2; black boxes behind their pip packages). This module
holds what they share:

* `RewardWeightsError`: the one error raised when weights are not on this machine (or are damaged or of
  another model type). Nothing here downloads:
  a source is a local folder/file, or a Hugging Face Hub id resolved **only from the local cache**
  (`local_files_only=True`); the message names the source, the files looked for, the cache folder and how to
  get the files on a machine with network.
* `MissingRewardPackageError`: an optional package (transformers, image-reward, hpsv2) is not installed; the
  message names the `pip install` that fixes it.
* `resolve_folder` / `resolve_file`: turn a path or a cached hub id into a local path, or raise the above.
* `hub_offline()`: a context manager that switches the Hub client to offline mode while a third-party package
  loads its own files, so that it cannot reach the network either.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from diffalign.rewards.protocol import Reward

#: Default sources of the factory's rewards (Hugging Face Hub ids, looked up in the local cache only).
DEFAULT_SOURCES: dict[str, str | None] = {
    # OpenAI CLIP ViT-L/14 (Radford et al. 2021), the backbone of CLIPScore reports and of the aesthetic head.
    "clip": "openai/clip-vit-large-patch14",
    # PickScore (Kirstain et al. 2023): CLIP-H fine-tuned on Pick-a-Pic; its tokenizer/processor come from
    # the CLIP-H checkpoint it was fine-tuned from.
    "pickscore": "yuvalkirstain/PickScore_v1",
    "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    # The aesthetic MLP head has no default: pass its `.pth`/`.safetensors` file (docs/rewards_external.md).
    "aesthetic": None,
    "aesthetic_clip": "openai/clip-vit-large-patch14",
    # ImageReward (Xu et al. 2023): checkpoint + med_config.json, ~/.cache/ImageReward or THUDM/ImageReward.
    "imagereward": "THUDM/ImageReward",
    # HPSv2 (Wu et al. 2023): xswu/HPSv2 checkpoints, looked up by the hpsv2 package itself.
    "hpsv2": "xswu/HPSv2",
}

EXTERNAL_REWARDS = ("clip", "pickscore", "aesthetic", "imagereward", "hpsv2")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class RewardWeightsError(FileNotFoundError):
    """The weights of an external reward model are not on this machine (nothing is ever downloaded), or the
    files found are not usable weights of that model (damaged, or another architecture's)."""


class MissingRewardPackageError(ImportError):
    """An optional package that an external reward needs is not installed."""


def require_package(module: str, pip_name: str, reward: str) -> ModuleType:
    """Import `module` or raise `MissingRewardPackageError` naming the `pip install` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingRewardPackageError(
            f"reward {reward!r} needs the Python package {module!r}, which is not importable ({err}); "
            f"install it with: pip install '{pip_name}'"
        ) from err


def hub_cache_dir() -> str:
    """The Hugging Face Hub cache folder that hub ids are resolved against (honours HF_HOME, HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def looks_like_hub_id(source: str) -> bool:
    """True for `name` or `org/name` shaped strings (which are not existing local paths)."""
    return bool(_HUB_ID.match(source)) and not source.startswith(".")


def _how_to_get(source: str) -> str:
    if looks_like_hub_id(source):
        return (
            f"to get them, run `huggingface-cli download {source}` (or `hf download {source}`) on a machine "
            f"with network and copy its cache folder here (set HF_HOME/HF_HUB_CACHE to point at it), or run "
            f"`huggingface-cli download {source} --local-dir DIR` and pass DIR as the path"
        )
    return "pass an existing local folder, or a Hugging Face Hub id that is in the local cache"


def _missing_error(source: str, what: str, looked_for: Sequence[str], detail: str) -> RewardWeightsError:
    return RewardWeightsError(
        f"weights for {what} not found: {detail}. Source: {source!r}; looked for {', '.join(looked_for)}; "
        f"Hugging Face cache: {hub_cache_dir()}; {_how_to_get(source)}. Nothing is downloaded by diffalign."
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a model repo, without touching the network, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None


def resolve_folder(source: str | os.PathLike[str], *, what: str, files: Sequence[Sequence[str]]) -> Path:
    """Resolve a local folder or a cached hub id to a folder holding `files`.

    `files` is a list of alternatives: from each inner group at least one name must exist in the folder (for
    example `[("config.json",), ("model.safetensors", "pytorch_model.bin")]`). Raises `RewardWeightsError`
    naming the source, the files, the cache folder and how to get them.
    """
    text = os.fspath(source)
    looked_for = [" or ".join(group) for group in files]
    path = Path(text).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists():
        raise _missing_error(text, what, looked_for, f"{path} is a file, expected a folder")
    elif looks_like_hub_id(text):
        snapshot = _cached_snapshot(text)
        if snapshot is None:
            raise _missing_error(
                text, what, looked_for, f"{text!r} is no local folder and not in the Hub cache"
            )
        folder = snapshot
    else:
        raise _missing_error(text, what, looked_for, f"no such folder {path}")
    missing = [" or ".join(group) for group in files if not any((folder / name).is_file() for name in group)]
    if missing:
        raise _missing_error(text, what, looked_for, f"{folder} lacks {', '.join(missing)}")
    return folder


def resolve_file(source: str | os.PathLike[str], *, what: str, names: Sequence[str]) -> Path:
    """Resolve a file path, a folder holding one of `names`, or a cached hub id holding one of `names`."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    folder = resolve_folder(text, what=what, files=[tuple(names)])
    return next(folder / name for name in names if (folder / name).is_file())


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Switch the Hugging Face Hub client (and transformers, which asks it) to offline mode for a block.

    Third-party reward packages call `hf_hub_download` / `from_pretrained` themselves; inside this block those
    calls resolve from the local cache or fail, and never reach the network.
    """
    from huggingface_hub import constants

    previous_env = os.environ.get("HF_HUB_OFFLINE")
    previous_flag = constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous_flag
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`None` (keep the checkpoint's float32), a torch dtype, or a name: float32/fp32, float16/fp16, bf16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}") from None


_ALIASES = {"clipscore": "clip", "laionaesthetic": "aesthetic", "hps": "hpsv2", "hpsv21": "hpsv2"}


def external_name(name: str) -> str | None:
    """The external reward `name` refers to (case, '-' and '_' ignored; aliases such as 'clipscore', 'hps',
    'laion-aesthetic' accepted), or None."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    return key if key in EXTERNAL_REWARDS else None


def load_external_reward(
    name: str,
    path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    **options: Any,
) -> Reward:
    """Load an external reward model by name from local weights.

    `name` is one of 'clip', 'pickscore', 'aesthetic', 'imagereward', 'hpsv2'; `path` a local folder/file or a
    hub id in the local cache, defaulting to `DEFAULT_SOURCES[name]` ('aesthetic' needs the head file).
    `options` go to the class's `load` (e.g. `scale=` for 'clip', `processor=` for 'pickscore', `clip=` for
    'aesthetic', `hps_version=` for 'hpsv2').
    """
    from diffalign.rewards import clip_rewards, package_rewards

    loaders = {
        "clip": clip_rewards.CLIPScoreReward.load,
        "pickscore": clip_rewards.PickScoreReward.load,
        "aesthetic": clip_rewards.AestheticReward.load,
        "imagereward": package_rewards.ImageRewardReward.load,
        "hpsv2": package_rewards.HPSv2Reward.load,
    }
    key = external_name(name)
    if key is None:
        raise ValueError(f"unknown external reward {name!r}; choose one of {', '.join(EXTERNAL_REWARDS)}")
    if path is None and key == "aesthetic":
        raise RewardWeightsError(
            "reward 'aesthetic' needs the aesthetic predictor's MLP head: pass its file as the path, e.g. "
            "sac+logos+ava1-l14-linearMSE.pth from "
            "github.com/christophschuhmann/improved-aesthetic-predictor "
            "(download it on a machine with network); the CLIP ViT-L/14 backbone comes from "
            f"{DEFAULT_SOURCES['aesthetic_clip']!r} in the Hugging Face cache ({hub_cache_dir()})"
        )
    return loaders[key](path, device=device, dtype=dtype, **options)
