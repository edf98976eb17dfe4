"""LoRA (Hu et al. 2022) on a diffusers UNet or transformer through peft, in diffusers' file format.

`add_lora` puts peft adapters on the denoiser and freezes its base weights; `lora_layers` returns the
adapter weights with diffusers' key names (what `pipeline.save_lora_weights` writes and
`pipeline.load_lora_weights` reads back); `merged_copy` is a plain copy of the denoiser with the
adapters folded into its weights (for saving a full pipeline).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: The attention projections diffusers' LoRA training scripts adapt by default.
DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(
    denoiser: nn.Module, rank: int, alpha: float | None, target_modules: Sequence[str] | None
) -> None:
    """Add adapters of `rank` (scale alpha / rank; alpha defaults to rank) on `target_modules`.

    The base weights are frozen; the adapter weights are kept in float32 even when the base is in
    bf16/fp16 (as diffusers' training scripts do with `cast_training_params`), so that optimiser
    updates are not rounded away.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"enable_lora: rank must be >= 1, got {rank}")
    targets = list(target_modules or DEFAULT_TARGETS)
    names = {name for name, _ in denoiser.named_modules()}
    if not any(name == t or name.endswith("." + t) for t in targets for name in names):
        raise ValueError(
            f"enable_lora: no module of {type(denoiser).__name__} matches target_modules {targets}"
        )
    denoiser.requires_grad_(False)
    denoiser.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=True)
    )
    for param in denoiser.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def lora_layers(denoiser: nn.Module) -> tuple[dict[str, Tensor], dict]:
    """The adapter weights in diffusers' naming, and the peft config (rank, alpha, targets) as a dict."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, denoiser.peft_config[
        "default"
    ].to_dict()


def merged_copy(denoiser: nn.Module) -> nn.Module:
    """A copy of the denoiser whose weights include the adapters (W + alpha/r B A), without peft layers."""
    return merge_in_place(copy.deepcopy(denoiser))


def merge_in_place(denoiser: nn.Module) -> nn.Module:
    """Fold the denoiser's adapters into its weights and remove the peft layers; every weight trainable."""
    denoiser.fuse_lora(lora_scale=1.0)
    denoiser.unload_lora()
    return denoiser.requires_grad_(True)


def trainable(module: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of `module` that require gradients."""
    return [p for p in module.parameters() if p.requires_grad]
