"""Advantages of policy-gradient fine-tuning: rewards turned into per-sample learning signals.

- DDPO (Black et al. 2023, sec. 4.3 and ddpo-pytorch's `PerPromptStatTracker`): each prompt keeps a
  buffer of its most recent rewards; a sample's advantage is its reward standardised by the mean and
  standard deviation of its prompt's buffer once the buffer holds `min_count` rewards, and by the
  whole batch's statistics before that.
- GRPO (Shao et al. 2024; Flow-GRPO, Liu et al. 2025): samples come in groups of the same prompt, and
  a sample's advantage is its reward standardised within its group.
Both are clipped to [-adv_clip, adv_clip] by the trainer (`clip_advantages`), as DDPO does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor

#: Added to standard deviations before dividing (ddpo-pytorch uses 1e-6, Flow-GRPO 1e-4).
STD_EPS = 1e-4


def standardise(values: Tensor, eps: float = STD_EPS) -> Tensor:
    """(values - mean) / (std + eps) with the population standard deviation (as numpy's np.std)."""
    values = values.double()
    return ((values - values.mean()) / (values.std(unbiased=False) + eps)).float()


def group_advantages(rewards: Tensor, group_size: int, eps: float = STD_EPS) -> Tensor:
    """GRPO advantages: rewards [G * group_size], consecutive groups of `group_size` samples of one
    prompt, each standardised within its group (a group with equal rewards gets advantage 0)."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-standardised advantages, got {group_size}")
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into groups of {group_size}")
    groups = rewards.double().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1).float()


def flat_group_fraction(rewards: Tensor, group_size: int) -> float:
    """The share of GRPO groups (consecutive `group_size` rewards) whose rewards are all equal: they
    get advantage 0 and teach nothing (common with a binary reward, or when a group's samples barely
    differ)."""
    groups = rewards.double().view(-1, group_size)
    return float((groups.amax(dim=1) == groups.amin(dim=1)).double().mean())


class PerPromptStatTracker:
    """DDPO's per-prompt reward statistics (ddpo-pytorch `stat_tracking.py`, same rules).

    Args:
        buffer_size: rewards kept per prompt (the most recent).
        min_count: below this many rewards for a prompt, the batch's mean and std are used instead.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor, eps: float = STD_EPS) -> Tensor:
        """Add this batch's rewards to their prompts' buffers and return the advantages [B]."""
        if len(prompts) != rewards.shape[0]:
            raise ValueError(f"{len(prompts)} prompts but {rewards.shape[0]} rewards")
        values = rewards.detach().double().cpu()
        batch_mean, batch_std = values.mean(), values.std(unbiased=False)
        advantages = torch.empty_like(values)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                stored = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = stored.mean(), stored.std(unbiased=False)
            advantages[rows] = (values[rows] - mean) / (std + eps)
        return advantages.float().to(rewards.device)

    def state_dict(self) -> dict:
        """The buffers, for checkpoints (JSON-serialisable)."""
        return {"buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {
            prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state["buffers"].items()
        }


def clip_advantages(advantages: Tensor, adv_clip: float) -> Tensor:
    """Clip to [-adv_clip, adv_clip] (DDPO's `adv_clip_max`); 0 or less disables clipping."""
    return advantages.clamp(-adv_clip, adv_clip) if adv_clip > 0 else advantages
