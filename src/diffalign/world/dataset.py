"""Training examples (scene, prompt, image) of the Shapes world, generated on demand.

A batch draws prompts from the world's grammar (weighted by task), lays out scenes that satisfy
them exactly (the objects named, nothing else; free colours at random) and renders them, all
vectorised on one torch device. Pretraining streams batches from here rather than from disk;
`write_dataset` stores a fixed set (uint8 images in one .npy file plus a JSONL of prompts and
scenes) for tools that want files.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffalign.world.grammar import Metadata, all_metadata
from diffalign.world.palette import CATEGORIES, DEFAULT_CANVAS_SIZE
from diffalign.world.render import render_batch, to_uint8
from diffalign.world.scene import LayoutConfig, SceneBatch, sample_scenes, templates_from_metadata


def default_category_weights() -> dict[str, float]:
    return dict.fromkeys(CATEGORIES, 1.0)


@dataclass
class DatasetConfig:
    """What the generated training distribution looks like.

    Attributes:
        canvas_size: image side in pixels.
        category_weights: relative frequency of each GenEval task among the prompts; within a task
            every distinct prompt is equally likely. Real caption data is mostly simple captions,
            so a pretraining mix can underweight the compositional tasks.
        layout: how scenes are laid out.
    """

    canvas_size: int = DEFAULT_CANVAS_SIZE
    category_weights: dict[str, float] = field(default_factory=default_category_weights)
    layout: LayoutConfig = field(default_factory=LayoutConfig)


@dataclass
class ShapesBatch:
    """A batch of training examples.

    Attributes:
        images: float [B, 3, H, W] in [0, 1].
        prompt_ids: [B] indices into the generator's `metadata`.
        prompts: the prompt texts.
        scenes: the scenes as tensors.
    """

    images: Tensor
    prompt_ids: Tensor
    prompts: list[str]
    scenes: SceneBatch


class ShapesGenerator:
    """Draws batches of (scene, prompt, image) on a device; deterministic for a given generator."""

    def __init__(self, config: DatasetConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.config = config or DatasetConfig()
        self.device = torch.device(device)
        if self.config.canvas_size < 1:
            raise ValueError(f"canvas size must be at least 1 pixel, got {self.config.canvas_size}")
        unknown = set(self.config.category_weights) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"category_weights: unknown task(s) {sorted(unknown)}; expected {CATEGORIES}")
        self.metadata: list[Metadata] = all_metadata()
        self.template = templates_from_metadata(self.metadata)
        per_tag = Counter(m["tag"] for m in self.metadata)
        weights = [self.config.category_weights.get(m["tag"], 0.0) / per_tag[m["tag"]] for m in self.metadata]
        w = torch.tensor(weights, dtype=torch.float64)
        if not (w >= 0).all() or w.sum() <= 0:
            raise ValueError("category_weights must be non-negative with a positive sum")
        self.prompt_probs = (w / w.sum()).float()

    def sample_prompt_ids(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        probs = self.prompt_probs.to(generator.device if generator is not None else self.device)
        ids = torch.multinomial(probs, n, replacement=True, generator=generator)
        return ids.to(self.device)

    def render(self, scenes: SceneBatch) -> Tensor:
        return render_batch(scenes, self.config.canvas_size)

    def scenes_for(self, prompt_ids: Tensor, generator: torch.Generator | None = None) -> SceneBatch:
        return sample_scenes(self.template, prompt_ids.to(self.device), self.config.layout, generator)

    def sample(self, n: int, generator: torch.Generator | None = None) -> ShapesBatch:
        """n examples. `generator` (CPU or on the device) makes the batch reproducible."""
        ids = self.sample_prompt_ids(n, generator)
        scenes = self.scenes_for(ids, generator)
        images = self.render(scenes)
        return ShapesBatch(images, ids, [self.metadata[i]["prompt"] for i in ids.tolist()], scenes)


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    config: DatasetConfig | None = None,
    batch_size: int = 4096,
    device: str = "cpu",
) -> Path:
    """Write n examples: images.npy (uint8 [n, H, W, 3]) and examples.jsonl (prompt, tag, scene)."""
    if n < 0:
        raise ValueError(f"the number of examples must be >= 0, got {n}")
    gen = ShapesGenerator(config, device)  # checks the config before the folder is made
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    size = gen.config.canvas_size
    images = np.lib.format.open_memmap(
        out / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3)
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    with open(out / "examples.jsonl", "w", encoding="utf-8") as f:
        done = 0
        while done < n:
            batch = gen.sample(min(batch_size, n - done), generator)
            images[done : done + len(batch.prompts)] = to_uint8(batch.images)
            for i, scene in enumerate(batch.scenes.to_scenes()):
                meta = gen.metadata[int(batch.prompt_ids[i])]
                record = {
                    "index": done + i,
                    "prompt": meta["prompt"],
                    "tag": meta["tag"],
                    "objects": [obj.__dict__ for obj in scene.objects],
                }
                f.write(json.dumps(record) + "\n")
            done += len(batch.prompts)
    images.flush()
    return out
