"""The Reward protocol: a callable `(images, prompts) -> Tensor[B]` with a name and a differentiable flag.

Images are float tensors `[B, 3, H, W]` in [0, 1] (what `DiffusionModel.decode` returns); prompts are a
list of B strings; the result is a float32 tensor of B rewards on the images' device. A reward that is
`differentiable` lets gradients flow from its output back to `images` (reward backpropagation and
reward guidance need that); any other reward is a black box and methods that need gradients refuse it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
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


def _label(name: str, source: str | None) -> str:
    return f"reward {name!r}" + (f" ({source})" if source else "")


def _as_tensor(output: object, label: str) -> Tensor:
    """A reward's raw output as a tensor; a list of tensors is stacked, which keeps their gradients."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (str, bytes)) or (isinstance(output, np.ndarray) and output.dtype.kind in "USV"):
        kind = output.dtype if isinstance(output, np.ndarray) else type(output).__name__
        raise RewardOutputError(f"{label} returned {kind} values, not numbers")
    if isinstance(output, (list, tuple)) and output and all(isinstance(v, Tensor) for v in output):
        if any(v.numel() != 1 for v in output):
            shapes = sorted({tuple(v.shape) for v in output if v.numel() != 1})
            raise RewardOutputError(f"{label} returned a list of tensors of shapes {shapes}, not numbers")
        try:
            return torch.stack([v.reshape(()) for v in output])
        except RuntimeError as err:  # mixed devices or dtypes
            raise RewardOutputError(f"{label} returned tensors that cannot be stacked: {err}") from err
    if isinstance(output, (list, tuple)) and any(isinstance(v, (str, bytes)) for v in output):
        raise RewardOutputError(f"{label} returned {type(output).__name__} of strings, not numbers")
    try:
        return torch.as_tensor(output, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise RewardOutputError(f"{label} returned {type(output).__name__}, not numbers: {err}") from err


def check_output(
    output: object, batch: int, name: str, *, allow_nonfinite: bool = False, source: str | None = None
) -> Tensor:
    """Turn a reward's raw output into a float32 tensor of shape [batch], or say exactly what is wrong.

    Accepted: a tensor, numpy array, list or tuple of numbers (or of one-element tensors, stacked so their
    gradients survive) of shape [batch] or [batch, 1]; a single number when `batch` is 1. Integers and
    booleans are converted, other float dtypes (half, bfloat16, float64) are cast to float32; complex
    numbers and strings are refused. `source` (e.g. `file.py:function`) is named in the errors.
    """
    label = _label(name, source)
    output = _as_tensor(output, label)
    if output.is_complex():
        raise RewardOutputError(f"{label} returned complex numbers ({output.dtype}); rewards must be real")
    if output.ndim == 0 and batch == 1:
        output = output.reshape(1)
    if output.ndim == 2 and output.shape[1] == 1:
        output = output[:, 0]
    if output.ndim != 1 or output.shape[0] != batch:
        images = f"{batch} image{'s' if batch != 1 else ''}"
        if output.ndim == 0:
            got = "a single number"
        elif output.ndim == 1:
            got = f"{output.shape[0]} value{'s' if output.shape[0] != 1 else ''}"
        else:
            got = f"shape {tuple(output.shape)}"
        raise RewardOutputError(
            f"{label} returned {got} for {images}; it must return one number per image "
            f"(shape [{batch}] or [{batch}, 1])"
        )
    if output.dtype != torch.float32:
        output = output.float()
    if not allow_nonfinite:
        values = output.detach()
        if not bool(torch.isfinite(values).all()):
            parts = []
            for what, mask in (("NaN", torch.isnan(values)), ("inf", torch.isinf(values))):
                index = mask.nonzero().flatten().tolist()
                if len(index) == 1:
                    parts.append(f"{what} for image {index[0]}")
                elif index:
                    more = f" and {len(index) - 10} more" if len(index) > 10 else ""
                    parts.append(f"{what} for images {index[:10]}{more}")
            raise RewardOutputError(
                f"{label} returned non-finite values: {'; '.join(parts)} (of {batch}, counted from 0)"
            )
    return output


def call_style(fn: object) -> str:
    """How a reward callable takes its inputs: 'images, prompts' (the protocol) or 'images' (it ignores the
    prompts). Raises TypeError when its signature accepts neither; an unknown signature counts as the
    protocol."""
    try:
        signature = inspect.signature(fn)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "images, prompts"
    for style, args in (("images, prompts", (None, None)), ("images", (None,))):
        try:
            signature.bind(*args)
        except TypeError:
            continue
        return style
    raise TypeError(
        f"{getattr(fn, '__qualname__', type(fn).__name__)}{signature} cannot be called as "
        "(images, prompts); a reward takes the images [B, 3, H, W] and the list of B prompts, "
        "or the images only"
    )


@dataclass
class FunctionReward:
    """A plain function `(images, prompts) -> rewards` (or `(images) -> rewards`) wrapped as a Reward, with
    its output checked. `source` (e.g. `file.py:function`) is named in errors."""

    fn: Callable[..., object]
    name: str
    differentiable: bool = False
    source: str | None = None
    takes_prompts: bool = True

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts, self.name)
        try:
            raw = self.fn(images, list(prompts)) if self.takes_prompts else self.fn(images)
        except Exception as err:
            if hasattr(err, "add_note"):  # Python 3.11+: the traceback says which reward failed
                err.add_note(f"raised by {_label(self.name, self.source)} on {images.shape[0]} images")
            raise
        return check_output(raw, images.shape[0], self.name, source=self.source).to(images.device)


def as_reward(
    obj: object, name: str | None = None, differentiable: bool | None = None, source: str | None = None
) -> Reward:
    """Return `obj` if it already is a Reward, else wrap a callable.

    A callable may declare `differentiable = True` as an attribute; otherwise it is treated as a black box.
    It is called as `obj(images, prompts)`, or as `obj(images)` when its signature takes one argument only;
    a signature that fits neither is refused here (TypeError), not at the first call.
    """
    if isinstance(obj, Reward) and name is None and differentiable is None and source is None:
        return obj
    if not callable(obj):
        raise TypeError(f"a reward must be callable as (images, prompts) -> Tensor[B], got {obj!r}")
    label = name or getattr(obj, "name", None) or getattr(obj, "__name__", type(obj).__name__)
    diff = differentiable if differentiable is not None else bool(getattr(obj, "differentiable", False))
    try:
        style = call_style(obj)
    except TypeError as err:
        raise TypeError(f"{_label(str(label), source)}: {err}") from None
    return FunctionReward(obj, str(label), diff, source, takes_prompts=style == "images, prompts")


def require_differentiable(reward: Reward, method: str) -> None:
    """Refuse a black-box reward for a method that needs d reward / d image."""
    if not getattr(reward, "differentiable", False):
        raise NotDifferentiableError(
            f"{method} backpropagates through the reward, but reward {reward.name!r} is not differentiable; "
            "use a differentiable reward (a learned reward model, CLIP score, PickScore, aesthetic) or a "
            "method that treats the reward as a black box (ddpo, grpo, dpo, best-of-N, FK steering)"
        )
