"""Black-box rewards behind their own pip packages: ImageReward and HPSv2 (optional extras, imported lazily).

Both packages take PIL images and detach their scores, so these rewards are `differentiable = False`: use them
with black-box methods (DDPO, GRPO, DPO data, best-of-N, FK steering) and for evaluation. Images are quantised
to 8-bit RGB PIL images, as the packages' own preprocessing expects. Their file look-ups run inside
`hub_offline()`, so they resolve from the local cache or fail; nothing is downloaded.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffalign.rewards.external import (
    DEFAULT_SOURCES,
    RewardWeightsError,
    hub_cache_dir,
    hub_offline,
    parse_dtype,
    require_package,
    resolve_folder,
)
from diffalign.rewards.protocol import check_images, check_output


def to_pil(images: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] floats in [0, 1] -> B RGB PIL images (clamped, rounded to 8 bits)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array.numpy()]


def score_by_prompt(
    images: Tensor, prompts: Sequence[str], score: Callable[[str, list[Image.Image]], Any], name: str
) -> Tensor:
    """Call `score(prompt, pil_images)` once per distinct prompt and put the scores back in batch order."""
    check_images(images, prompts, name)
    pils = to_pil(images)
    out = torch.empty(len(pils), dtype=torch.float32)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    for prompt, index in groups.items():
        values = torch.as_tensor(np.asarray(score(prompt, [pils[i] for i in index]), dtype=np.float32))
        values = values.reshape(-1)
        if values.numel() != len(index):
            raise ValueError(
                f"reward {name!r}: {len(index)} images for prompt {prompt!r} got {values.numel()} scores"
            )
        out[index] = values
    return check_output(out, images.shape[0], name).to(images.device)


def _require_float32(dtype: torch.dtype | str | None, name: str) -> None:
    if parse_dtype(dtype) not in (None, torch.float32):
        raise ValueError(
            f"reward {name!r} runs in its package's own precision; dtype={dtype!r} is not supported"
        )


class ImageRewardReward:
    """ImageReward (Xu et al. 2023): BLIP ViT-L + MLP trained on ImageRewardDB rankings (Bradley-Terry);
    scores are standardised (mean 0, std 1 on their data). Through `image-reward`:
    `RM.load(checkpoint, device=...)`, `model.score(prompt, [pil images])`. A black box: the package
    detaches its scores."""

    differentiable = False

    def __init__(self, model: Any, name: str = "imagereward") -> None:
        self.model, self.name = model, name

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
    ) -> ImageRewardReward:
        """`path`: ImageReward.pt (with med_config.json beside it), a folder holding both, or a hub id in the
        cache (default: ~/.cache/ImageReward when it holds both, else `THUDM/ImageReward`). The package also
        loads the `bert-base-uncased` tokenizer, which must be in the Hugging Face cache."""
        _require_float32(dtype, "imagereward")
        rm = require_package("ImageReward", "image-reward", "imagereward")
        checkpoint = cls._resolve(path)
        try:
            with hub_offline():
                model = rm.load(str(checkpoint), device=str(device), download_root=str(checkpoint.parent))
        except OSError as err:
            raise RewardWeightsError(
                f"ImageReward could not load its files offline from {checkpoint.parent} ({err}); it needs "
                f"ImageReward.pt and med_config.json there and bert-base-uncased in {hub_cache_dir()}: run "
                "`huggingface-cli download THUDM/ImageReward` and "
                "`huggingface-cli download bert-base-uncased` on a machine with network"
            ) from err
        model.eval()
        model.requires_grad_(False)
        return cls(model)

    @staticmethod
    def _resolve(path: str | os.PathLike[str] | None) -> Path:
        files = [("ImageReward.pt",), ("med_config.json",)]
        default = path is None
        if path is None:
            home = Path("~/.cache/ImageReward").expanduser()
            if all((home / name).is_file() for (name,) in files):
                return home / "ImageReward.pt"
            path = DEFAULT_SOURCES["imagereward"]
            assert path is not None
        file = Path(path).expanduser()
        if file.is_file():
            if not (file.parent / "med_config.json").is_file():
                raise RewardWeightsError(f"ImageReward needs med_config.json beside {file}; it is missing")
            return file
        what = "reward 'imagereward'" + (" (~/.cache/ImageReward lacks them too)" if default else "")
        return resolve_folder(path, what=what, files=files) / "ImageReward.pt"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            return score_by_prompt(images, prompts, self.model.score, self.name)


class HPSv2Reward:
    """HPSv2 / HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"): OpenCLIP ViT-H/14 fine-tuned on
    HPDv2; the score is the image-text cosine (typically ~0.2-0.35). Through `hpsv2`:
    `hpsv2.score(pil_images, prompt, hps_version=...)`, or `hpsv2.img_score.score(..., cp=path)` for a
    local checkpoint file.

    Limitations of the package: it picks its own device (CUDA when available), ignores `device`/`dtype`, and
    reloads its checkpoint on every call, so this is for evaluation rather than inner training loops. Its
    files come from the Hub cache (`xswu/HPSv2`, and the OpenCLIP ViT-H-14 laion2B weights).
    """

    differentiable = False

    def __init__(self, module: Any, hps_version: str = "v2.1", checkpoint: Path | None = None) -> None:
        self.module, self.hps_version, self.checkpoint = module, hps_version, checkpoint
        self.name = "hpsv2"

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        hps_version: str = "v2.1",
    ) -> HPSv2Reward:
        """`path`: an HPS checkpoint file (e.g. HPS_v2.1_compressed.pt); default: the package's own look-up of
        `xswu/HPSv2` in the Hugging Face cache (checked here first)."""
        _require_float32(dtype, "hpsv2")
        if hps_version not in ("v2.0", "v2.1"):
            raise ValueError(f"hps_version must be 'v2.0' or 'v2.1', got {hps_version!r}")
        module = require_package("hpsv2", "hpsv2", "hpsv2")
        filename = f"HPS_{'v2' if hps_version == 'v2.0' else 'v2.1'}_compressed.pt"
        if path is not None:
            checkpoint = Path(path).expanduser()
            if not checkpoint.is_file():
                raise RewardWeightsError(
                    f"HPSv2 checkpoint {checkpoint} not found (expected a file like {filename})"
                )
            return cls(module, hps_version, checkpoint)
        from huggingface_hub import try_to_load_from_cache

        repo = DEFAULT_SOURCES["hpsv2"]
        assert repo is not None
        if not isinstance(try_to_load_from_cache(repo, filename), str):
            raise RewardWeightsError(
                f"HPSv2 weights {repo}/{filename} are not in the Hugging Face cache ({hub_cache_dir()}); run "
                f"`huggingface-cli download {repo} {filename}` (and laion/CLIP-ViT-H-14-laion2B-s32B-b79K) "
                "on a machine with network, or pass the checkpoint file as the path"
            )
        return cls(module, hps_version)

    def _score(self, prompt: str, pils: list[Image.Image]) -> Any:
        try:
            with hub_offline():
                if self.checkpoint is not None:
                    img_score = importlib.import_module(f"{self.module.__name__}.img_score")
                    return img_score.score(
                        pils, prompt, cp=str(self.checkpoint), hps_version=self.hps_version
                    )
                return self.module.score(pils, prompt, hps_version=self.hps_version)
        except OSError as err:
            raise RewardWeightsError(
                f"hpsv2 could not find its files offline ({err}); it needs xswu/HPSv2 and the OpenCLIP "
                f"ViT-H-14 laion2B-s32B-b79K weights in {hub_cache_dir()}"
            ) from err

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            return score_by_prompt(images, prompts, self._score, self.name)
