"""The model interface every sampler, trainer and steering method is written against.

A `DiffusionModel` is anything that turns prompts into a conditioning and predicts the raw network
output for a noisy latent. The tiny Shapes-world models and the diffusers adapters both implement it;
the maths in `diffalign.diffusion` only ever talks to this protocol, so this module imports nothing
else of the package.

Time convention (the `t` passed to `predict`):
- DDPM-family models (`prediction_type` "epsilon" or "v_prediction"): the training timestep, a float
  tensor holding integer values in [0, num_train_timesteps), as in diffusers' schedulers.
- Flow models (`prediction_type` "flow"): the noise level t in [0, 1] of the rectified flow
  x_t = (1 - t) x0 + t eps (SD3's sigma). The network's velocity target is v = eps - x0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

PredictionType = Literal["epsilon", "v_prediction", "flow"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "flow")


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompts: a bag of tensors that all have the batch as their first dimension.

    The tiny models store token states and a padding mask; a Stable Diffusion adapter stores
    `prompt_embeds`, SDXL adds `pooled` and `add_time_ids`. Samplers never look inside: they only
    index, concatenate and move it.
    """

    tensors: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {name: int(t.shape[0]) for name, t in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Conditioning tensors disagree on the batch size: {sizes}")

    def __len__(self) -> int:
        for tensor in self.tensors.values():
            return int(tensor.shape[0])
        return 0

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> Conditioning:
        if isinstance(index, int):
            index = slice(index, index + 1)
        elif not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return Conditioning(
            {
                name: t[index.to(t.device) if isinstance(index, Tensor) else index]
                for name, t in self.tensors.items()
            }
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move every tensor; `dtype` applies to floating-point tensors only (masks keep theirs)."""
        moved = {}
        for name, t in self.tensors.items():
            target_dtype = dtype if (dtype is not None and t.is_floating_point()) else None
            moved[name] = t.to(device=device, dtype=target_dtype)
        return Conditioning(moved)

    def detach(self) -> Conditioning:
        return Conditioning({name: t.detach() for name, t in self.tensors.items()})

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each prompt `repeats` times in a row (for several samples per prompt)."""
        return Conditioning({name: t.repeat_interleave(repeats, dim=0) for name, t in self.tensors.items()})

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch (all items must hold the same tensor names)."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one item")
        names = list(items[0].tensors)
        for item in items[1:]:
            if list(item.tensors) != names:
                raise ValueError(f"Conditioning.cat: tensor names differ: {names} vs {list(item.tensors)}")
        return Conditioning(
            {name: torch.cat([item.tensors[name] for item in items], dim=0) for name in names}
        )


@runtime_checkable
class DiffusionModel(Protocol):
    """What a model must offer to be sampled, aligned, steered and evaluated.

    Attributes:
        prediction_type: what `predict` returns: "epsilon" (noise), "v_prediction"
            (v = sqrt(abar) eps - sqrt(1 - abar) x0) or "flow" (velocity eps - x0).
        schedule: the noise schedule the model was trained with (a `DDPMSchedule` for epsilon and
            v models, a `FlowSchedule` for flow models; see `diffalign.diffusion.schedules`).
        latent_shape: (channels, height, width) of one latent.
    """

    prediction_type: PredictionType
    latent_shape: tuple[int, int, int]

    @property
    def schedule(self): ...

    @property
    def device(self) -> torch.device: ...

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts; the empty string "" is the unconditional prompt used by guidance."""
        ...

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The raw network output for latents `x_t` [B,C,H,W] at times `t` [B] (see module doc)."""
        ...

    def reference_predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The frozen base model's output, without gradients (a frozen copy or LoRA disabled)."""
        ...

    def encode(self, images: Tensor) -> Tensor:
        """Images [B,3,H,W] in [0,1] -> latents (identity-like for pixel models, the VAE otherwise)."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images [B,3,H,W] in [0,1] (differentiable; clamping is the caller's choice)."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser should update (all of them, or only the LoRA adapters)."""
        ...

    def save(self, directory: str) -> None:
        """Write the model in diffusers' formats (config JSON + safetensors) under `directory`."""
        ...
