"""Differentiable rewards built on CLIP (transformers `CLIPModel`): CLIP score, PickScore, LAION aesthetic.

All three preprocess the images in torch (`clip_preprocess`): resize the shorter side to the model's
`vision_config.image_size` with antialiased bicubic interpolation, centre crop to a square, normalise with the
processor's mean/std. This mirrors `CLIPImageProcessor` (which works on uint8 PIL images) closely but not
bit-exactly, and keeps the gradient from the score to every pixel, as reward backpropagation needs
(Clark et al. 2024, DRaFT; Prabhudesai et al. 2023, AlignProp). The reward's own weights are frozen
(`requires_grad_(False)`, eval mode) and live on their own device; images are moved there and the scores are
moved back to the images' device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.rewards.external import (
    DEFAULT_SOURCES,
    RewardWeightsError,
    parse_dtype,
    require_package,
    resolve_file,
    resolve_folder,
)
from diffalign.rewards.protocol import check_images, check_output

#: OpenAI CLIP's normalisation constants (Radford et al. 2021), used only when a model folder has no
#: preprocessor_config.json with image_mean/image_std. LAION's OpenCLIP ViT-H/14 uses the same values.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def clip_preprocess(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """CLIP's image preprocessing in differentiable torch ops, on float images in [0, 1].

    Shorter side resized to `size` (bicubic, antialiased, aspect ratio kept; skipped when already `size`),
    centre crop `size` x `size` (offsets rounded as torchvision's `center_crop`), then `(x - mean) / std`.
    Bicubic overshoot is not clamped (clamping would zero the gradient of saturated pixels).
    """
    x = images.float()
    height, width = x.shape[-2:]
    if min(height, width) != size:
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    height, width = x.shape[-2:]
    top, left = round((height - size) / 2), round((width - size) / 2)
    x = x[..., top : top + size, left : left + size]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _load_clip_model(transformers: Any, folder: Path, what: str) -> nn.Module:
    """`CLIPModel.from_pretrained(folder)`, refusing what is not a complete CLIP checkpoint.

    transformers would load another architecture's folder (a BERT, a ViT) into a CLIPModel with freshly
    initialised weights and only a warning; a reward from random weights is refused here instead, as are
    damaged files. Raises `RewardWeightsError` naming the folder.
    """
    config = _read_json(folder / "config.json", what)
    model_type = config.get("model_type", "clip") if isinstance(config, dict) else None
    if model_type != "clip":
        raise RewardWeightsError(
            f"{what}: {folder} holds a {model_type!r} model (model_type in config.json), not a CLIP model "
            "(model_type 'clip')"
        )
    try:
        model, info = transformers.CLIPModel.from_pretrained(
            folder, local_files_only=True, output_loading_info=True
        )
    except Exception as err:  # corrupt safetensors (SafetensorError), size mismatches (RuntimeError), ...
        raise RewardWeightsError(
            f"{what}: cannot load a CLIP model from {folder} ({type(err).__name__}: {err})"
        ) from err
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise RewardWeightsError(
            f"{what}: the weights in {folder} lack {len(missing)} of CLIP's tensors (e.g. {missing[:3]}); "
            "it is not a complete CLIP checkpoint, and missing weights would be random"
        )
    return model


def _read_json(file: Path, what: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RewardWeightsError(f"{what}: {file} is not readable JSON ({err})") from err


def read_normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where from): `image_mean`/`image_std` of the folder's preprocessor_config.json when it has
    them, else OpenAI CLIP's constants (`OPENAI_CLIP_MEAN`/`OPENAI_CLIP_STD`), reported as the third item."""
    config = folder / "preprocessor_config.json"
    if config.is_file():
        data = _read_json(config, "the CLIP preprocessor config")
        if isinstance(data, dict) and "image_mean" in data and "image_std" in data:
            return tuple(map(float, data["image_mean"])), tuple(map(float, data["image_std"])), str(config)
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "openai-clip-defaults"


def _features(output: Any) -> Tensor:
    # transformers < 5 returns the projected features; 5.x a ModelOutput whose pooler_output holds them.
    return output if isinstance(output, Tensor) else output.pooler_output


class CLIPEmbedder(nn.Module):
    """A frozen CLIPModel + tokenizer giving L2-normalised float32 image and text embeddings."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        normalisation_source: str = "openai-clip-defaults",
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalisation_source = normalisation_source
        self.image_size = int(model.config.vision_config.image_size)
        positions = int(model.config.text_config.max_position_embeddings)
        self.max_length = min(positions, int(getattr(tokenizer, "model_max_length", positions) or positions))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str],
        processor: str | os.PathLike[str] | None = None,
        *,
        what: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
    ) -> CLIPEmbedder:
        """Load a CLIPModel from `source` and the tokenizer + normalisation from `processor` (default:
        `source`), each a local folder or a hub id from the local cache only."""
        transformers = require_package("transformers", "transformers>=4.40", what)
        folder = resolve_folder(source, what=what, files=[("config.json",), _WEIGHT_FILES])
        proc_folder = resolve_folder(
            processor if processor is not None else source, what=f"{what} tokenizer", files=[_TOKENIZER_FILES]
        )
        model = _load_clip_model(transformers, folder, what)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(proc_folder, local_files_only=True)
        except (
            Exception
        ) as err:  # a damaged tokenizer file fails in many ways (tokenizers raises plain Exception)
            raise RewardWeightsError(
                f"{what}: cannot load the tokenizer from {proc_folder} ({type(err).__name__}: {err})"
            ) from err
        mean, std, where = read_normalisation(proc_folder)
        torch_dtype = parse_dtype(dtype)
        model = model.to(device=torch.device(device), dtype=torch_dtype) if torch_dtype else model.to(device)
        return cls(model, tokenizer, mean, std, where)

    def image_features(self, images: Tensor) -> Tensor:
        """Normalised image embeddings [B, D] in float32 for images [B, 3, H, W] in [0, 1] (any device)."""
        pixels = clip_preprocess(images.to(self.device), self.image_size, self.mean, self.std)
        feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.dtype))).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Normalised text embeddings [B, D] in float32; prompts truncated to the model's max length."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        output = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        feats = _features(output).float()
        return feats / feats.norm(dim=-1, keepdim=True)


class FrozenModule(nn.Module):
    """A module that stays in eval mode with frozen weights: `train()` is a no-op, so a trainer that switches
    every module to training mode cannot turn on the reward's dropout."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)


ClipScale = Literal["cosine", "torchmetrics", "hessel"]
_SCALES: dict[str, tuple[float, bool]] = {
    "cosine": (1.0, False),
    "torchmetrics": (100.0, True),
    "hessel": (2.5, True),
}


class CLIPScoreReward(FrozenModule):
    """Image-text agreement of CLIP (Radford et al. 2021): cosine of the image and prompt embeddings.

    `scale` picks the convention: 'cosine' (default) is the raw cosine in [-1, 1], the smooth quantity to
    optimise; 'torchmetrics' is `100 * max(cos, 0)` as torchmetrics' CLIPScore reports it (the number in most
    diffusion papers, ~20-35 for matching pairs with ViT-L/14); 'hessel' is CLIP-S of Hessel et al. 2021,
    `2.5 * max(cos, 0)`. The clipped conventions have zero gradient where the cosine is negative.
    """

    differentiable = True

    def __init__(self, embedder: CLIPEmbedder, scale: ClipScale = "cosine", name: str = "clip") -> None:
        super().__init__()
        if scale not in _SCALES:
            raise ValueError(f"scale must be one of {sorted(_SCALES)}, got {scale!r}")
        self.embedder, self.scale, self.name = embedder, scale, name
        self.freeze()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        scale: ClipScale = "cosine",
        processor: str | os.PathLike[str] | None = None,
    ) -> CLIPScoreReward:
        """Load from a local folder or cached hub id (default `openai/clip-vit-large-patch14`)."""
        source = path or DEFAULT_SOURCES["clip"]
        assert source is not None
        return cls(
            CLIPEmbedder.load(source, processor, what="reward 'clip'", device=device, dtype=dtype), scale
        )

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts, self.name)
        cos = (self.embedder.image_features(images) * self.embedder.text_features(prompts)).sum(-1)
        factor, clip_at_zero = _SCALES[self.scale]
        score = factor * (cos.clamp(min=0) if clip_at_zero else cos)
        return check_output(score, images.shape[0], self.name).to(images.device)


class PickScoreReward(FrozenModule):
    """PickScore (Kirstain et al. 2023, "Pick-a-Pic"): `logit_scale.exp() * cos(image, prompt)` of a CLIP-H
    fine-tuned on Pick-a-Pic preferences, as the official code scores (typically ~18-23). Differentiable."""

    differentiable = True

    def __init__(self, embedder: CLIPEmbedder, name: str = "pickscore") -> None:
        super().__init__()
        self.embedder, self.name = embedder, name
        self.freeze()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        processor: str | os.PathLike[str] | None = None,
    ) -> PickScoreReward:
        """Model from `path` (default `yuvalkirstain/PickScore_v1`), tokenizer and mean/std from `processor`
        (default: `path` itself when it holds a tokenizer, else `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`)."""
        source = path or DEFAULT_SOURCES["pickscore"]
        assert source is not None
        if processor is None:
            folder = resolve_folder(
                source, what="reward 'pickscore'", files=[("config.json",), _WEIGHT_FILES]
            )
            has_tokenizer = any((folder / name).is_file() for name in _TOKENIZER_FILES)
            processor = folder if has_tokenizer else DEFAULT_SOURCES["pickscore_processor"]
        embedder = CLIPEmbedder.load(source, processor, what="reward 'pickscore'", device=device, dtype=dtype)
        return cls(embedder)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts, self.name)
        cos = (self.embedder.image_features(images) * self.embedder.text_features(prompts)).sum(-1)
        score = self.embedder.model.logit_scale.exp().float() * cos
        return check_output(score, images.shape[0], self.name).to(images.device)


class AestheticHead(nn.Module):
    """The MLP of the LAION "improved aesthetic predictor" (C. Schuhmann, 2022).

    Linear layers with dropout and no activations between them, in `self.layers`, so the state-dict keys are
    layers.{0,2,4,6,7}.{weight,bias}, as in the public sac+logos+ava1-l14-linearMSE.pth (input 768 for L/14).
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)


def load_aesthetic_head(path: str | os.PathLike[str]) -> AestheticHead:
    """Load the head from a `.pth` (torch.load, weights_only=True) or `.safetensors` file with keys
    `layers.N.weight/bias` (a bare `N.*` state dict is accepted too). The input size is read from
    `layers.0.weight`. Raises `RewardWeightsError` naming the file when it does not fit."""
    file = resolve_file(path, what="reward 'aesthetic' head", names=["sac+logos+ava1-l14-linearMSE.pth"])
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # not a checkpoint: UnpicklingError, SafetensorError, RuntimeError, EOFError...
        raise RewardWeightsError(
            f"{file} is not a readable .pth/.safetensors checkpoint of the aesthetic MLP head "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RewardWeightsError(f"{file} is not a state dict of tensors (the aesthetic MLP head)")
    state = {k if k.startswith("layers.") else f"layers.{k}": v for k, v in state.items()}
    if "layers.0.weight" not in state:
        raise RewardWeightsError(f"{file} has no layers.0.weight; keys: {sorted(state)[:12]}")
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RewardWeightsError(f"{file} does not fit the aesthetic MLP head: {err}") from err
    return head


class AestheticReward(FrozenModule):
    """LAION aesthetic predictor: CLIP ViT-L/14 image embedding, L2-normalised, through the MLP head trained
    by MSE on 1-10 ratings (SAC + LAION-Logos + AVA); scores are on that 1-10 scale. The prompt is ignored.
    Differentiable; the head runs in float32 on the backbone's device."""

    differentiable = True

    def __init__(self, embedder: CLIPEmbedder, head: nn.Module, name: str = "aesthetic") -> None:
        super().__init__()
        dim = int(embedder.model.config.projection_dim)
        first = next(m for m in head.modules() if isinstance(m, nn.Linear))
        if first.in_features != dim:
            raise ValueError(
                f"aesthetic head takes {first.in_features}-d embeddings, but the CLIP backbone gives {dim}-d"
            )
        self.embedder, self.name = embedder, name
        self.head = head.to(embedder.device, torch.float32)
        self.freeze()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        clip: str | os.PathLike[str] | None = None,
    ) -> AestheticReward:
        """Head from `path` (file, or folder holding sac+logos+ava1-l14-linearMSE.pth); backbone from `clip`
        (default `openai/clip-vit-large-patch14`, local folder or cached hub id)."""
        if path is None:
            raise RewardWeightsError(
                "reward 'aesthetic' needs the path of its MLP head (.pth or .safetensors)"
            )
        head = load_aesthetic_head(path)
        backbone = clip or DEFAULT_SOURCES["aesthetic_clip"]
        assert backbone is not None
        return cls(
            CLIPEmbedder.load(backbone, what="reward 'aesthetic' backbone", device=device, dtype=dtype), head
        )

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts, self.name)
        score = self.head(self.embedder.image_features(images))[:, 0]
        return check_output(score, images.shape[0], self.name).to(images.device)
