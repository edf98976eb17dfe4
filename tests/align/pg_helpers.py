"""Small configs and rewards for the online-RL tests: policy gradients and DiffusionNFT (tiny 16x16
unet-xs models on the CPU)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffalign.align.nft_config import NFTConfig
from diffalign.align.pg_config import PGConfig
from diffalign.align.runtime import RuntimeConfig


class Redness:
    """A cheap, non-differentiable reward: the mean of red minus the mean of green and blue."""

    name = "redness"
    differentiable = False

    def __call__(self, images: Tensor, prompts) -> Tensor:
        return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


class NaNAfter:
    """Redness until `calls` calls have been made, NaN afterwards."""

    name = "nan-after"
    differentiable = False

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self.seen = 0

    def __call__(self, images: Tensor, prompts) -> Tensor:
        self.seen += 1
        out = Redness()(images, prompts)
        return out if self.seen <= self.calls else torch.full_like(out, float("nan"))


#: What the policy-gradient and DiffusionNFT test configs share: 4 prompts x 2 samples, 4 sampling
#: steps, no guidance, no gold reward, the CPU.
SMALL_ONLINE_RL = dict(
    reward="redness",
    gold="none",
    num_steps=4,
    guidance_scale=1.0,
    epochs=3,
    prompts_per_epoch=4,
    samples_per_prompt=2,
    sample_batch_size=8,
    train_batch_size=8,
    lr=1e-3,
    log_every=1,
    checkpoint_every=2,
    grid_every=0,
    log_with="none",
)


def pg_config(model_dir: Path | str, **overrides) -> PGConfig:
    """A small CPU policy-gradient config (`SMALL_ONLINE_RL`, PPO clip 0.2)."""
    values = dict(SMALL_ONLINE_RL, model=str(model_dir), clip_range=0.2, stat_min_count=2)
    values["runtime"] = RuntimeConfig(device="cpu")
    values.update(overrides)
    return PGConfig(**values)


def nft_config(model_dir: Path | str, **overrides) -> NFTConfig:
    """A small CPU DiffusionNFT config (`SMALL_ONLINE_RL`, 2 training levels a sample)."""
    values = dict(SMALL_ONLINE_RL, model=str(model_dir), timesteps_per_sample=2)
    values["runtime"] = RuntimeConfig(device="cpu")
    values.update(overrides)
    return NFTConfig(**values)


def trainable(model) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.unet.named_parameters() if p.requires_grad}
