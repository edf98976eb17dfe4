"""A reward model on a device of its own.

A large reward model (PickScore's CLIP-H, HPSv2) beside a large policy can exhaust one GPU; `OnDevice`
keeps the reward model on another device (a second GPU, or the CPU): each call moves the images there
and the rewards back. `Tensor.to` is differentiable, so reward backpropagation and reward guidance work
across the two devices unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.rewards.protocol import Reward


class OnDevice:
    """`reward` evaluated on `device`; its rewards return to the images' device (see the module doc)."""

    def __init__(self, reward: Reward, device: torch.device | str) -> None:
        self.reward = reward
        self.device = torch.device(device)
        self.name = reward.name
        self.differentiable = bool(getattr(reward, "differentiable", False))

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.reward(images.to(self.device), prompts).to(images.device)


def place_reward(spec: str, reward: Reward | None, device: torch.device, reward_device: str | None) -> Reward:
    """The trainer's reward: `reward` when given (tests, notebooks), else `spec` loaded on `reward_device`
    (or on `device` when None), wrapped in `OnDevice` when that is another device."""
    from diffalign.rewards.registry import load_reward

    if reward is not None:
        return reward
    target = torch.device(reward_device) if reward_device else device
    loaded = load_reward(spec, device=target)
    return loaded if target == torch.device(device) else OnDevice(loaded, target)


def check_reward_device(value: str | None) -> None:
    """Validate a config's `reward_device` ("cpu", "cuda", "cuda:N", or None)."""
    if value is None:
        return
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise ValueError(f"reward_device: {value!r} is not a device ({error})") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"reward_device must be cpu, cuda or cuda:N, got {value!r}")
