"""Stable Diffusion XL (`StableDiffusionXLPipeline`): two CLIP text encoders, pooled text embeddings
and SDXL's added time ids (Podell et al. 2023, sec. 2.2, "micro-conditioning").

The conditioning holds `prompt_embeds` [B, 77, D1 + D2] (both encoders' penultimate hidden states side
by side), `pooled` [B, D2] (the second encoder's projected embedding) and `add_time_ids` [B, 6] =
(original height, width, crop top, left, target height, width) = (H, W, 0, 0, H, W) at this adapter's
resolution, as the pipeline builds them by default. When the pipeline's config sets
`force_zeros_for_empty_prompt` (SDXL base does), the empty prompt encodes to zeros, which is what the
pipeline uses as the unconditional input of classifier-free guidance; other prompts are encoded by
the pipeline's own `encode_prompt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from diffalign.diffusion.protocol import Conditioning
from diffalign.models.diffusers_adapters.common import DiffusersAdapter


class StableDiffusionXLAdapter(DiffusersAdapter):
    """`DiffusionModel` for `StableDiffusionXLPipeline` (see the module doc)."""

    required_components: ClassVar[tuple[str, ...]] = (
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    )

    @property
    def unet(self) -> nn.Module:
        return self.denoiser

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        prompts = list(prompts)
        pipe = self.pipeline
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        if pipe.config.get("force_zeros_for_empty_prompt", True):
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        size = (self.resolution, self.resolution)
        time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=int(pooled.shape[-1])
        )
        time_ids = time_ids.to(embeds.device).repeat(len(prompts), 1)
        return Conditioning({"prompt_embeds": embeds, "pooled": pooled, "add_time_ids": time_ids})

    def network_output(self, network: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        c = cond.tensors
        added = {"text_embeds": c["pooled"], "time_ids": c["add_time_ids"]}
        return network(
            x_t, t, encoder_hidden_states=c["prompt_embeds"], added_cond_kwargs=added, return_dict=False
        )[0]
