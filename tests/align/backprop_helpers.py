"""Small configs and differentiable rewards for the reward-backpropagation tests (16x16 unet-xs, CPU)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from diffalign.align.backprop_config import BackpropConfig
from diffalign.align.runtime import RuntimeConfig


class DiffRedness:
    """A differentiable reward: the mean of red minus the mean of green and blue."""

    name = "diff-redness"
    differentiable = True

    def __call__(self, images: Tensor, prompts) -> Tensor:
        return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


class DiffNaNAfter(DiffRedness):
    """DiffRedness for `calls` calls, NaN afterwards."""

    name = "diff-nan-after"

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self.seen = 0

    def __call__(self, images: Tensor, prompts) -> Tensor:
        self.seen += 1
        out = super().__call__(images, prompts)
        return out if self.seen <= self.calls else out * float("nan")


def bp_config(model_dir: Path | str, method: str = "alignprop", **overrides) -> BackpropConfig:
    """A small CPU config: 4 prompts per step, 4 DDIM steps, no guidance, no gold reward."""
    values = dict(
        method=method,
        model=str(model_dir),
        reward="diff-redness",
        gold="none",
        num_steps=4,
        guidance_scale=1.0,
        steps=3,
        batch_size=4,
        pretrain_batch_size=4,
        lr=1e-3,
        log_every=1,
        checkpoint_every=2,
        log_with="none",
        runtime=RuntimeConfig(device="cpu"),
    )
    values.update(overrides)
    return BackpropConfig(**values)


def trainable(model) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.unet.named_parameters() if p.requires_grad}
