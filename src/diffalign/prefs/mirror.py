"""Mirror augmentation of preference data: flip the images, exchange the spatial words of the prompt.

A left-right flip of an image drawn for "a circle left of a square" is an image drawn for "a circle
right of a square"; an upside-down flip turns "above" into "below". Where what the raters value is
symmetric under mirroring once those words are exchanged, a pair mirrored this way keeps its label,
so every pair gives up to four (the identity, two flips and both). That holds exactly in the Shapes
world: GenEval's relations are read from centroids, shapes are accepted at every rotation, the panel's
quality and taste (size, warmth, centrality) do not change under flips. On 600 samples of the
shipped base model the grader's verdict and the panel's features were unchanged for every image
(docs/reward_models.md); `tests/prefs/test_mirror.py` checks it on renderings. It is not true of
every image domain (text in images, upright scenes: sky above, ground below), so the trainers offer
it as an option that is off by default.

Both images of a pair (and a DPO winner and its loser) always get the same flips: they share the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

HORIZONTAL_WORDS: dict[str, str] = {"left": "right", "right": "left"}
VERTICAL_WORDS: dict[str, str] = {"above": "below", "below": "above", "top": "bottom", "bottom": "top"}


def exchange_words(prompt: str, table: dict[str, str]) -> str:
    """`prompt` with every whole word of `table` replaced by its partner (case-insensitive match;
    the partner is written in lower case)."""
    pattern = r"\b(" + "|".join(map(re.escape, table)) + r")\b"
    return re.sub(pattern, lambda m: table[m.group(1).lower()], prompt, flags=re.IGNORECASE)


def mirror_prompt(prompt: str, horizontal: bool, vertical: bool) -> str:
    """The prompt of an image flipped left-right (`horizontal`) and/or upside down (`vertical`)."""
    if horizontal:
        prompt = exchange_words(prompt, HORIZONTAL_WORDS)
    if vertical:
        prompt = exchange_words(prompt, VERTICAL_WORDS)
    return prompt


def draw_mirrors(n: int, generator: torch.Generator) -> Tensor:
    """[n, 2] bool: for each example, flip left-right (column 0) and upside down (column 1), each
    with probability 0.5, independently."""
    return torch.rand(n, 2, generator=generator) < 0.5


def mirror_images(images: Tensor, flips: Tensor) -> Tensor:
    """Images [n, C, H, W] (any dtype) flipped as `flips` [n, 2] says: column 0 left-right, column 1
    upside down. Returns a new tensor; rows without a flip are copied unchanged."""
    if images.shape[0] != flips.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {flips.shape[0]} rows of flips")
    out = images.clone()
    for column, dim in ((0, -1), (1, -2)):
        rows = flips[:, column].nonzero()[:, 0].to(images.device)
        if len(rows):
            out[rows] = out[rows].flip(dim)
    return out


def mirror_prompts(prompts: Sequence[str], flips: Tensor) -> list[str]:
    """Each prompt with the spatial words of its row of `flips` exchanged."""
    if len(prompts) != flips.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {flips.shape[0]} rows of flips")
    return [mirror_prompt(p, bool(h), bool(v)) for p, (h, v) in zip(prompts, flips.tolist(), strict=True)]
