"""What every online trainer (policy gradient, reward backpropagation) logs about its samples.

- `sample_metrics`: the training reward's mean and spread, the gold reward's mean when a gold reward is
  given (the Shapes world's truth, `diffalign.rewards.gold`: what a learned or proxy reward is aiming
  at), and the diversity of the samples.
- Diversity is the mean pairwise root-mean-square pixel distance between samples of the same prompt
  (images in [0, 1], so 0 means identical samples and 1 the largest possible difference), averaged over
  the prompts that have at least two samples; NaN when no prompt has two. Pixels are the feature space:
  the Shapes world's images are small and flat-coloured, so pixel distance sees collapse onto one layout
  or colour directly (a learned feature space would be needed for photographs).
- `save_image_grid` writes a PNG grid; `log_image_grid` also sends it to TensorBoard when the run's
  Accelerate trackers include it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffalign.evaluate.diversity import per_prompt_variety, pixel_features
from diffalign.evaluate.report import image_grid
from diffalign.rewards.protocol import Reward


def diversity(images: Tensor, prompts: list[str]) -> float:
    """Mean pairwise RMS pixel distance between images of the same prompt (NaN if no prompt has two).

    Args:
        images: [B, 3, H, W] in [0, 1].
        prompts: the B prompts (samples with equal strings form a group).
    """
    if images.ndim != 4 or len(prompts) != images.shape[0]:
        raise ValueError(f"diversity: {len(prompts)} prompts for images of shape {tuple(images.shape)}")
    return per_prompt_variety(pixel_features(images), prompts)


def sample_metrics(
    images: Tensor, prompts: list[str], rewards: Tensor, gold: Reward | None
) -> dict[str, float]:
    """The metrics of one batch of samples.

    Args:
        images: [B, 3, H, W] in [0, 1] (gradients are not followed).
        prompts: the B prompts.
        rewards: [B] the training reward of each image.
        gold: the world's gold reward, or None (then no "gold_mean").

    Returns:
        {"reward_mean", "reward_std", "diversity"} and "gold_mean" when `gold` is given; reward_std is
        the population spread (0 for one sample).
    """
    if rewards.shape[0] != images.shape[0]:
        raise ValueError(f"sample_metrics: {rewards.shape[0]} rewards for {images.shape[0]} images")
    images = images.detach().float()
    values = rewards.detach().float()
    out = {
        "reward_mean": float(values.mean()),
        "reward_std": float(values.std(unbiased=False)),
        "diversity": diversity(images, prompts),
    }
    if gold is not None:
        with torch.no_grad():
            out["gold_mean"] = float(gold(images, list(prompts)).float().mean())
    return out


def grid_array(images: Tensor, nrow: int) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> one uint8 grid [H', W', 3] with `nrow` images per row."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"an image grid needs [B>0, 3, H, W] images, got {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rgb = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return np.asarray(image_grid(rgb.cpu().numpy(), cols=nrow))


def save_image_grid(images: Tensor, path: Path, nrow: int) -> None:
    """Write `images` ([B, 3, H, W] in [0, 1]) as one PNG grid with `nrow` images per row (4x enlarged)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_array(images, nrow)).save(path)


def log_image_grid(accelerator, tag: str, images: Tensor, step: int, nrow: int) -> bool:
    """Send the grid of `images` to the run's TensorBoard tracker; False when there is none."""
    if not accelerator.is_main_process or not accelerator.log_with:
        return False
    try:
        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    except (ValueError, KeyError):
        return False
    if not hasattr(tracker, "add_image"):
        return False
    tracker.add_image(tag, grid_array(images, nrow), global_step=step, dataformats="HWC")
    return True
