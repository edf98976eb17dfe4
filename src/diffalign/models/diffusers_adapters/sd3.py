"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): an MMDiT transformer trained as a rectified
flow (Esser et al. 2024) with `FlowMatchEulerDiscreteScheduler`, two CLIP encoders and T5.

Time: the protocol's flow time t in [0, 1] (x_t = (1 - t) x0 + t eps) is SD3's sigma; the
transformer takes the timestep t * num_train_timesteps (1000), as the pipeline passes
`scheduler.timesteps`. Its output is the velocity v = eps - x0.

Conditioning: `prompt_embeds` [B, 77 + L, D] (the two CLIP encoders' penultimate states side by side,
zero-padded to T5's width, followed by L = `max_sequence_length` T5 tokens; zeros when the pipeline
has no T5) and `pooled` [B, D1 + D2], both from the pipeline's own `encode_prompt`. The empty prompt
is the unconditional input, as in the pipeline without a negative prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor, nn

from diffalign.diffusion.protocol import Conditioning
from diffalign.models.diffusers_adapters.common import DiffusersAdapter


class StableDiffusion3Adapter(DiffusersAdapter):
    """`DiffusionModel` for `StableDiffusion3Pipeline` (see the module doc)."""

    denoiser_name: ClassVar[str] = "transformer"
    lora_layers_argument: ClassVar[str] = "transformer_lora_layers"
    #: T5 (text_encoder_3) is optional: without it its part of the prompt embedding is zeros.
    required_components: ClassVar[tuple[str, ...]] = (
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    )
    prediction_types: ClassVar[tuple[str, ...]] = ("flow",)

    @property
    def transformer(self) -> nn.Module:
        return self.denoiser

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.config.max_sequence_length,
        )
        return Conditioning({"prompt_embeds": embeds, "pooled": pooled})

    def network_output(self, network: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        timestep = t * float(self.pipeline.scheduler.config.num_train_timesteps)
        return network(
            hidden_states=x_t,
            timestep=timestep,
            encoder_hidden_states=cond.tensors["prompt_embeds"],
            pooled_projections=cond.tensors["pooled"],
            return_dict=False,
        )[0]
