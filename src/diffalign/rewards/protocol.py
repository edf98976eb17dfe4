"""The Reward protocol: a callable `(images, prompts) -> Tensor[B]` with a name and a differentiable flag.

Images are float tensors `[B, 3, H, W]` in [0, 1] (what `DiffusionModel.decode` returns); prompts are a
list of B strings; the result is a float tensor of B rewards on the images' device. A reward that is
`differentiable` lets gradients flow from its output back to `images` (reward backpropagation and
reward guidance need that); any other reward is a black box and methods that need gradients refuse it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Reward(Protocol):
    """What every reward provides; plain functions become one through `as_reward`."""

    name: str
    differentiable: bool

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


class RewardOutputError(ValueError):
    """A reward returned something that is not one finite number per image."""


class NotDifferentiableError(TypeError):
    """A method that backpropagates through the reward was given a black-box reward."""


def check_images(images: Tensor, prompts: Sequence[str], name: str) -> None:
    """Validate a reward's inputs, naming the reward in the error."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"reward {name!r}: images must be a [B, 3, H, W] tensor in [0, 1], got {shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"reward {name!r}: {images.shape[0]} images but {len(prompts)} prompts")


def check_output(output: object, batch: int, name: str, *, allow_nonfinite: bool = False) -> Tensor:
    """Turn a reward's raw output into a float tensor of shape [batch], or say exactly what is wrong."""
    if not isinstance(output, Tensor):
        try:
            output = torch.as_tensor(output, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise RewardOutputError(
                f"reward {name!r} returned {type(output).__name__}, not numbers: {err}"
            ) from err
    if output.ndim == 2 and output.shape[1] == 1:
        output = output[:, 0]
    if output.ndim != 1 or output.shape[0] != batch:
        raise RewardOutputError(
            f"reward {name!r} must return one number per image (shape [{batch}]), got {tuple(output.shape)}"
        )
    if not output.is_floating_point():
        output = output.float()
    if not allow_nonfinite and not bool(torch.isfinite(output.detach()).all()):
        bad = (~torch.isfinite(output.detach())).nonzero().flatten().tolist()
        raise RewardOutputError(f"reward {name!r} returned non-finite values for images {bad[:10]}")
    return output


@dataclass
class FunctionReward:
    """A plain function `(images, prompts) -> rewards` wrapped as a Reward, with its output checked."""

    fn: Callable[[Tensor, Sequence[str]], object]
    name: str
    differentiable: bool = False

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts, self.name)
        out = check_output(self.fn(images, list(prompts)), images.shape[0], self.name)
        return out.to(images.device)


def as_reward(obj: object, name: str | None = None, differentiable: bool | None = None) -> Reward:
    """Return `obj` if it already is a Reward, else wrap a callable.

    A callable may declare `differentiable = True` as an attribute; otherwise it is treated as a black box.
    """
    if isinstance(obj, Reward) and name is None and differentiable is None:
        return obj
    if not callable(obj):
        raise TypeError(f"a reward must be callable as (images, prompts) -> Tensor[B], got {obj!r}")
    label = name or getattr(obj, "name", None) or getattr(obj, "__name__", type(obj).__name__)
    diff = differentiable if differentiable is not None else bool(getattr(obj, "differentiable", False))
    return FunctionReward(obj, str(label), diff)  # type: ignore[arg-type]


def require_differentiable(reward: Reward, method: str) -> None:
    """Refuse a black-box reward for a method that needs d reward / d image."""
    if not getattr(reward, "differentiable", False):
        raise NotDifferentiableError(
            f"{method} backpropagates through the reward, but reward {reward.name!r} is not differentiable; "
            "use a differentiable reward (a learned reward model, CLIP score, PickScore, aesthetic) or a "
            "method that treats the reward as a black box (ddpo, grpo, dpo, best-of-N, FK steering)"
        )
