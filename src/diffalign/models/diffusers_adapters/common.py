"""What every diffusers adapter shares: options, the VAE, the reference model, LoRA and saving.

A `DiffusersAdapter` wraps a loaded diffusers pipeline behind the `DiffusionModel` protocol
(`diffalign.diffusion.protocol`). Subclasses (sd.py, sdxl.py, sd3.py) add only what differs between
families: how prompts are encoded into a `Conditioning` and how the denoiser is called. Sampling
never uses the pipeline's scheduler: `diffalign.diffusion.sampling` runs on the schedule read from
it (`scheduling.py`).

Latents. `encode` maps images in [0, 1] to the VAE posterior mean, z = (E(2x - 1) - shift) * scale,
and `decode` inverts it, x = (D(z / scale + shift) + 1) / 2 (`scaling_factor`, `shift_factor` of the
VAE config; SD 1.x/2.x/XL have no shift). The posterior mean (not a sample) keeps `encode`
deterministic; diffusers' training scripts draw a sample instead.

Reference model. As for the tiny models: with LoRA the reference is the same denoiser with its
adapters disabled (no second copy); with full fine-tuning it is a frozen copy made by
`freeze_reference` (the trainers call it before their first step).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from diffalign.diffusion.protocol import Conditioning
from diffalign.diffusion.schedules import DDPMSchedule, FlowSchedule
from diffalign.models.diffusers_adapters import lora as lora_utils
from diffalign.models.diffusers_adapters.scheduling import schedule_from_scheduler
from diffalign.models.reference import FrozenReference

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class AdapterConfig:
    """How to load and run a diffusers pipeline (memory and precision options).

    Attributes:
        dtype: weights of the denoiser and text encoders: "float32", "bfloat16" or "float16". The VAE
            follows, except that with float16 a VAE whose config sets `force_upcast` (SD 1.x/XL) runs
            in float32, as the pipelines do. Model outputs are returned in float32.
        resolution: image height and width in pixels; None uses the denoiser's `sample_size` times the
            VAE's downsampling factor (512 for SD 1.5, 1024 for SDXL and SD3).
        gradient_checkpointing: recompute the denoiser's activations in the backward pass
            (diffusers' `enable_gradient_checkpointing`): less memory, about a third more compute.
        channels_last: store the denoiser's and VAE's 4-D weights channels-last (faster convolutions
            on recent GPUs and on CPU).
        allow_tf32: let float32 matrix products and convolutions use TF32 on NVIDIA GPUs (Ampere and
            later; a process-wide torch switch). Only where the device is CUDA; on other devices there
            is no such mode. Full fine-tuning in reduced precision is best done with dtype float32
            plus Accelerate's bf16 autocast (float32 master weights), or with TF32.
        vae_decode_chunk: decode at most this many latents per VAE call (0: the whole batch at once);
            bounds the decoder's activation memory, the largest of a sampling step.
        max_sequence_length: T5 tokens per prompt for SD3 (the pipeline's default 256); ignored by the
            CLIP-only families.
        lora_rank: if > 0, add LoRA adapters of this rank at load time (else call `enable_lora`).
        lora_alpha: LoRA alpha (scale alpha / rank); None means alpha = rank.
        lora_target_modules: module names to adapt; None uses the attention projections
            (to_q, to_k, to_v, to_out.0) as diffusers' LoRA scripts do.
    """

    dtype: str = "float32"
    resolution: int | None = None
    gradient_checkpointing: bool = False
    channels_last: bool = False
    allow_tf32: bool = False
    vae_decode_chunk: int = 0
    max_sequence_length: int = 256
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {self.resolution}")
        if self.vae_decode_chunk < 0:
            raise ValueError(f"vae_decode_chunk must be >= 0, got {self.vae_decode_chunk}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class DamagedPipelineError(ValueError):
    """A pipeline folder whose components are missing, unreadable, corrupt, of unknown classes, or do not
    fit together (a flow-matching scheduler for an SD UNet, a DDPM one for an SD3 transformer)."""


class DiffusersAdapter(FrozenReference, abc.ABC):
    """A diffusers pipeline behind the `DiffusionModel` protocol (see the module doc).

    Subclasses set `denoiser_name` ("unet" or "transformer"), `lora_layers_argument` (the keyword of
    the pipeline's `save_lora_weights`), and implement `encode_prompts` and `network_output`.

    Attributes (besides the protocol's):
        pipeline: the wrapped diffusers pipeline (its denoiser is trained in place).
        denoiser: the UNet or transformer (also `unet` / `transformer` by family).
        vae: the pipeline's AutoencoderKL.
        image_shape: (3, resolution, resolution) of the images `encode` takes and `decode` returns.
        lora: whether LoRA adapters are enabled.
    """

    denoiser_name: ClassVar[str] = "unet"
    lora_layers_argument: ClassVar[str] = "unet_lora_layers"
    #: extra keyword arguments of `DiffusionPipeline.from_pretrained` for this family.
    load_overrides: ClassVar[dict] = {}
    #: pipeline components the adapter cannot work without (`load_adapter` checks them).
    required_components: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    #: what this family's denoiser predicts; the scheduler's prediction type must be one of these.
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")

    def __init__(
        self, pipeline, config: AdapterConfig | None = None, device: torch.device | str = "cpu"
    ) -> None:
        self.pipeline = pipeline
        self.config = config or AdapterConfig()
        device = torch.device(device)
        dtype = self.config.torch_dtype
        self.denoiser: nn.Module = getattr(pipeline, self.denoiser_name)
        self.vae: nn.Module = pipeline.vae
        vae_dtype = torch.float32 if dtype == torch.float16 and self.vae.config.get("force_upcast") else dtype
        for name, component in pipeline.components.items():
            if isinstance(component, nn.Module):
                target = vae_dtype if name == "vae" else dtype
                if component.dtype == target:
                    component.to(device)
                else:
                    component.to(device, target)
                component.requires_grad_(False).eval()
        self.denoiser.requires_grad_(True)
        if self.config.allow_tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.config.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if self.config.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        sample_size = self.denoiser.config.sample_size
        resolution = self.config.resolution or int(sample_size) * self.vae_scale_factor
        if resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {resolution} is not a multiple of the VAE factor {self.vae_scale_factor}"
            )
        self.resolution = resolution
        size = resolution // self.vae_scale_factor
        self.latent_shape = (int(self.denoiser.config.in_channels), size, size)
        self.image_shape = (3, resolution, resolution)
        scheduler = pipeline.scheduler
        self.prediction_type, self._schedule = schedule_from_scheduler(
            type(scheduler).__name__, scheduler.config, self.image_seq_len()
        )
        if self.prediction_type not in self.prediction_types:
            raise DamagedPipelineError(
                f"{type(pipeline).__name__} with a {type(scheduler).__name__} ({self.prediction_type}): its "
                f"{self.denoiser_name} predicts {' or '.join(self.prediction_types)}, so the scheduler is "
                "of another model family"
            )
        self._reference: nn.Module | None = None
        self.lora = False
        if self.config.lora_rank > 0:
            self.enable_lora(self.config.lora_rank, self.config.lora_alpha, self.config.lora_target_modules)

    # --- family-specific ---------------------------------------------------------------------------

    def image_seq_len(self) -> int:
        """Latent tokens per image (used by flow schedulers with resolution-dependent shifting)."""
        _, h, w = self.latent_shape
        patch = int(getattr(self.denoiser.config, "patch_size", 1) or 1)
        return (h // patch) * (w // patch)

    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts with the pipeline's text encoders; "" is the unconditional prompt."""

    @abc.abstractmethod
    def network_output(self, network: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Call `network` on inputs already in its dtype and on its device (family-specific)."""

    # --- the DiffusionModel interface --------------------------------------------------------------

    @property
    def schedule(self) -> DDPMSchedule | FlowSchedule:
        return self._schedule

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's compute dtype (the config's `dtype`)."""
        return self.config.torch_dtype

    def to(self, device: torch.device | str) -> DiffusersAdapter:
        for component in self.pipeline.components.values():
            if isinstance(component, nn.Module):
                component.to(device)
        if self._reference is not None:
            self._reference.to(device)
        return self

    def _inputs(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor, Conditioning]:
        """x_t in the denoiser's dtype (channels-last if asked), t as one value per sample, cond moved."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        x = x_t.to(self.device, self.dtype)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, t.to(self.device, torch.float32), cond.to(self.device, self.dtype)

    def forward_network(self, network: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The float32 prediction of `network`: this adapter's denoiser, its frozen copy, or the denoiser
        as wrapped by `accelerator.prepare` (DDP/FSDP), which is what a trainer's forward goes through."""
        x, tt, c = self._inputs(x_t, t, cond)
        return self.network_output(network, x, tt, c).float().contiguous()

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.forward_network(self.denoiser, x_t, t, cond)

    def call_network(self, network: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """`FrozenReference`'s hook: the prediction of `network` (the denoiser or its frozen copy)."""
        return self.forward_network(network, x_t, t, cond)

    def encode(self, images: Tensor) -> Tensor:
        vae = self.vae
        x = images.to(self.device, vae.dtype) * 2.0 - 1.0
        z = vae.encode(x).latent_dist.mode()
        shift = vae.config.get("shift_factor") or 0.0
        return ((z.float() - shift) * vae.config.scaling_factor).float()

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        shift = vae.config.get("shift_factor") or 0.0
        z = latents.to(self.device, torch.float32) / vae.config.scaling_factor + shift
        chunk = self.config.vae_decode_chunk or z.shape[0]
        parts = [vae.decode(part.to(vae.dtype)).sample.float() for part in z.split(chunk)]
        return (torch.cat(parts) + 1.0) / 2.0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return lora_utils.trainable(self.denoiser)

    # --- LoRA --------------------------------------------------------------------------------------

    def enable_lora(
        self, rank: int = 8, alpha: float | None = None, target_modules: Sequence[str] | None = None
    ) -> None:
        """Add LoRA adapters (peft) to the denoiser and freeze its base weights (see `lora.add_lora`)."""
        if self.lora:
            raise ValueError("enable_lora: LoRA adapters are already enabled")
        lora_utils.add_lora(self.denoiser, rank, alpha, target_modules)
        self.lora = True
        self._reference = None

    def merge_lora(self) -> None:
        """Fold the adapters into the denoiser's weights (`fuse_lora`) and drop them: a plain full
        denoiser again, every weight trainable, its reference the merged model (made on first use)."""
        if not self.lora:
            raise ValueError("merge_lora: this model has no LoRA adapters")
        lora_utils.merge_in_place(self.denoiser)
        self.lora = False
        self._reference = None

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    def save_lora(self, directory: str | Path) -> None:
        """Write the adapters as `pytorch_lora_weights.safetensors`, the file `load_lora_weights` reads."""
        if not self.lora:
            raise ValueError("save_lora: this model has no LoRA adapters (call enable_lora first)")
        layers, metadata = lora_utils.lora_layers(self.denoiser)
        prefix = self.lora_layers_argument.removesuffix("_lora_layers")
        type(self.pipeline).save_lora_weights(
            str(directory), **{self.lora_layers_argument: layers, f"{prefix}_lora_adapter_metadata": metadata}
        )

    def save(self, directory: str | Path) -> None:
        """Write a complete diffusers pipeline folder (`save_pretrained`, safetensors). With LoRA, the
        adapters are folded into a copy of the denoiser first; `save_lora` writes the adapters alone."""
        pipeline = self.pipeline
        if self.lora:
            components = dict(pipeline.components)
            components[self.denoiser_name] = lora_utils.merged_copy(self.denoiser)
            # the pipeline's registered options (SD's requires_safety_checker, SDXL's
            # force_zeros_for_empty_prompt) are not components: pass them on unchanged
            options = {
                k: v for k, v in pipeline.config.items() if not k.startswith("_") and k not in components
            }
            pipeline = type(pipeline)(**components, **options)
        pipeline.save_pretrained(str(directory), safe_serialization=True)
