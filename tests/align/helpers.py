"""Tiny models and preference pairs for the alignment tests."""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.align.dpo import DPOConfig
from diffalign.align.runtime import RuntimeConfig
from diffalign.models.tiny import TinyDiffusionModel
from diffalign.prefs.pairs import PreferencePairs
from diffalign.world.dataset import DatasetConfig, ShapesGenerator

CANVAS = 16


def save_tiny_model(folder: Path, prediction_type: str) -> Path:
    """A randomly initialised unet-xs model on a 16x16 canvas, saved to `folder`. Its output convolution,
    which starts at zero (so nothing before it gets a gradient), is drawn at random like a trained one."""
    torch.manual_seed(0)
    model = TinyDiffusionModel.create(prediction_type, "unet-xs", CANVAS)
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    model.save(folder)
    return folder


def make_pairs(n: int, seed: int = 0, ties: int = 0) -> PreferencePairs:
    """n pairs of rendered Shapes-world scenes for the same prompt; the last `ties` pairs are ties."""
    gen = ShapesGenerator(DatasetConfig(canvas_size=CANVAS))
    g = torch.Generator().manual_seed(seed)
    first = gen.sample(n, g)
    second = gen.render(gen.scenes_for(first.prompt_ids, g))
    prob = torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(n)])
    if ties:
        prob[n - ties :] = 0.5
    to_u8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731
    return PreferencePairs(first.prompts, to_u8(first.images), to_u8(second), prob)


def config(model_dir: Path, **overrides) -> DPOConfig:
    """A small CPU config for tests."""
    values = dict(
        model=str(model_dir),
        steps=4,
        batch_size=4,
        lr=1e-3,
        warmup_steps=1,
        log_every=1,
        checkpoint_every=2,
        log_with="none",
        runtime=RuntimeConfig(device="cpu"),
    )
    values.update(overrides)
    return DPOConfig(**values)


def store_with_preferences(path, n: int = 6, ties: int = 2) -> dict[bytes, str]:
    """A preference store at `path` of n `make_pairs` pairs (the last `ties` tied); returns
    {preferred image as uint8 bytes: its prompt}."""
    from diffalign.prefs.records import NewComparison
    from diffalign.prefs.simulate import encode_png
    from diffalign.prefs.store import PreferenceStore

    pairs = make_pairs(n, seed=5, ties=ties)
    items, preferred = [], {}
    for i in range(n):
        prob = float(pairs.prob_a[i])
        tie = prob == 0.5
        chosen = None if tie else (0 if prob == 1.0 else 1)
        items.append(
            NewComparison(
                prompt=pairs.prompts[i],
                images=[encode_png(pairs.images_a[i]), encode_png(pairs.images_b[i])],
                choice="tie" if tie else "image",
                chosen=chosen,
                rater="r",
                source="test",
                key=f"test:{i}",
            )
        )
        if not tie:
            image = pairs.images_a[i] if chosen == 0 else pairs.images_b[i]
            preferred[image.numpy().tobytes()] = pairs.prompts[i]
    PreferenceStore.open(path).add(items)
    return preferred
