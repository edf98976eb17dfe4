"""Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`): one CLIP text encoder, a UNet predicting
epsilon or v (the scheduler config's `prediction_type`).

Prompts are encoded by the pipeline's own `encode_prompt` (CLIP's last hidden state, padded to the
tokenizer's 77 tokens); the unconditional prompt of classifier-free guidance is the empty string,
exactly as the pipeline encodes it when no negative prompt is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor, nn

from diffalign.diffusion.protocol import Conditioning
from diffalign.models.diffusers_adapters.common import DiffusersAdapter


class StableDiffusionAdapter(DiffusersAdapter):
    """`DiffusionModel` for `StableDiffusionPipeline` (conditioning: `prompt_embeds` [B, 77, D])."""

    #: extra `from_pretrained` arguments: the safety checker is not part of the model being aligned.
    load_overrides: ClassVar[dict] = {
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }

    @property
    def unet(self) -> nn.Module:
        return self.denoiser

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        embeds, _ = self.pipeline.encode_prompt(
            list(prompts), self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning({"prompt_embeds": embeds})

    def network_output(self, network: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        # t: integer-valued training timesteps (float); the UNet's sinusoidal embedding takes them as is.
        return network(x_t, t, encoder_hidden_states=cond.tensors["prompt_embeds"], return_dict=False)[0]
