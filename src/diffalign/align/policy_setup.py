"""The model a trainer fine-tunes, set up the same way by every trainer, for any `DiffusionModel`.

The trainers (`dpo.py`, `policy_gradient.py`, `reward_backprop.py`) never reach into a model's
internals: they train `model.denoiser` (the tiny models' UNet, a pipeline's UNet or transformer) through
`model.call_network(network, x_t, t, cond)` with the network as `accelerator.prepare` wrapped it, encode
prompts with `model.encode_prompts`, images with `model.encode`, and optimise
`model.trainable_parameters()`. `load_policy` is the one place that loads the model, adds LoRA and
fixes the reference, so that a Shapes-world model and a Stable Diffusion pipeline go through the same
steps.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from diffalign.models.diffusers_adapters.common import AdapterConfig
from diffalign.models.registry import load_model


def adapter_options(value: AdapterConfig | dict) -> AdapterConfig:
    """A trainer config's `pipeline` field as an `AdapterConfig` (YAML gives a mapping). Its own
    `lora_rank` must stay 0: LoRA is the trainer's `lora_rank`, added after loading."""
    options = AdapterConfig(**value) if isinstance(value, dict) else value
    if options.lora_rank:
        raise ValueError(
            f"pipeline.lora_rank={options.lora_rank}: set the trainer's lora_rank instead (the pipeline "
            "options set only precision, memory and the LoRA target modules)"
        )
    return options


def is_pipeline(model) -> bool:
    """Whether `model` wraps a diffusers pipeline (rather than being a tiny Shapes-world model)."""
    return hasattr(model, "pipeline")


def load_policy(
    spec: str,
    device: torch.device | str,
    *,
    lora_rank: int,
    lora_alpha: float,
    pipeline: AdapterConfig,
    reference: str | None = None,
    fix_reference: bool = True,
    loaded=None,
):
    """Load `spec` (a tiny model, or a diffusers pipeline with the `pipeline` options), add LoRA
    adapters when `lora_rank` > 0, and fix its reference: the model as loaded (a frozen copy, or the
    adapters switched off), or the model `reference` names; `fix_reference=False` skips that (no
    frozen copy is made, for a model that is only sampled). Returns the model, its network in eval mode.

    `loaded` is a model the caller already loaded from `spec` with the same `pipeline` options on
    `device` and has not changed (e.g. the one that sampled an online round's pairs): it is set up in
    place instead of loading `spec` a second time.

    Raises ValueError when `pipeline` options other than the defaults are given for a tiny model (they
    would be ignored), or when `loaded` is on another device than `device`."""
    if loaded is not None:
        if not same_device(loaded.device, device):
            raise ValueError(f"the loaded model of {spec!r} is on {loaded.device}, the trainer on {device}")
        model = loaded
    else:
        model = load_model(spec, device=device, diffusers_options=pipeline)
    if not is_pipeline(model) and pipeline != AdapterConfig():
        changed = {k: v for k, v in asdict(pipeline).items() if v != getattr(AdapterConfig(), k)}
        raise ValueError(
            f"pipeline options {changed} apply to diffusers pipelines; model {spec!r} is a tiny "
            "Shapes-world model"
        )
    if lora_rank > 0:
        targets = pipeline.lora_target_modules if is_pipeline(model) else None
        model.enable_lora(lora_rank, alpha=lora_alpha or None, target_modules=targets)
    if reference is not None:
        model.set_reference(load_model(reference, device=device, diffusers_options=pipeline))
    if fix_reference:
        model.freeze_reference()  # the reference is the model as loaded, before any checkpoint
    model.denoiser.eval()
    return model


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two device specs name the same device ("cuda" is the current CUDA device)."""
    a, b = torch.device(a), torch.device(b)

    def index(d: torch.device) -> int:
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if d.type == "cuda" else 0

    return a.type == b.type and index(a) == index(b)


def policy_for(config, device: torch.device | str, loaded=None):
    """`load_policy` with a trainer config's fields (`model`, `lora_rank`, `lora_alpha`, `pipeline`, and
    `reference` where the config has one); `loaded` as in `load_policy`."""
    return load_policy(
        config.model,
        device,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        pipeline=config.pipeline,
        reference=getattr(config, "reference", None),
        loaded=loaded,
    )
