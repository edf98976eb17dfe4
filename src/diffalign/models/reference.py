"""The reference model every `DiffusionModel` implementation offers in the same way.

Preference and KL-regularised trainers compare the policy with a frozen reference:
- full fine-tuning: a frozen copy of the denoiser, made by `freeze_reference` (trainers call it before
  their first step or checkpoint load, so a resumed run's reference is still the model as loaded), or
  another model's denoiser (`set_reference`: online DPO and SPIN train against an earlier iterate);
- LoRA: the same denoiser with its adapters switched off, so no second copy exists.

`FrozenReference` is mixed into the tiny models and the diffusers adapters. A class using it has the
attributes `denoiser` (the trained network), `lora` (bool), `_reference` (the frozen copy or None),
`latent_shape`, `device`, a context manager `adapters_disabled()`, and `call_network(network, x_t, t,
cond)`, the float prediction of a given network (the denoiser or its frozen copy).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from diffalign.diffusion.protocol import Conditioning


class FrozenReference:
    """`freeze_reference`, `set_reference` and `reference_predict` (see the module doc)."""

    def freeze_reference(self) -> None:
        """Fix the reference now: a frozen copy of the current denoiser (nothing with LoRA, whose
        reference is the adapters switched off)."""
        if not self.lora and self._reference is None:
            self._reference = copy.deepcopy(self.denoiser).requires_grad_(False).eval()

    def set_reference(self, other: FrozenReference) -> None:
        """Use `other`'s current denoiser, frozen, as the reference instead of this model's own. Needs
        full fine-tuning: with LoRA the reference is always the adapters switched off."""
        if self.lora:
            raise ValueError("set_reference: with LoRA the reference is this model with its adapters off")
        if (
            type(other) is not type(self)
            or getattr(other, "prediction_type", None) != getattr(self, "prediction_type", None)
            or other.latent_shape != self.latent_shape
        ):
            raise ValueError(
                f"set_reference: the reference is a {type(other).__name__} "
                f"({getattr(other, 'prediction_type', '?')}) on {other.latent_shape}, this one a "
                f"{type(self).__name__} ({getattr(self, 'prediction_type', '?')}) on {self.latent_shape}"
            )
        reference = copy.deepcopy(other.denoiser).to(self.device).requires_grad_(False).eval()
        if set(reference.state_dict()) != set(self.denoiser.state_dict()):
            raise ValueError("set_reference: the reference network's weights differ from this model's")
        self._reference = reference

    def reference_network(self):
        """The frozen reference network, or None (LoRA, whose reference is the adapters switched off,
        or before `freeze_reference`)."""
        return self._reference

    def reference_predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The reference's prediction, without gradients."""
        with torch.no_grad():
            if self.lora:
                with self.adapters_disabled():
                    return self.call_network(self.denoiser, x_t, t, cond)
            self.freeze_reference()
            return self.call_network(self._reference, x_t, t, cond)
