"""Sample a model on ShapesEval in GenEval's layout and score it: what `diffalign eval` runs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.evaluate.geneval_layout import score_folder, write_prompt_folder
from diffalign.world.grammar import Metadata
from diffalign.world.render import to_uint8
from diffalign.world.shapeseval import load_shapeseval

#: A sampler hook: (model, prompts, seeds, sampler config) -> images [B, 3, H, W] in [0, 1]; e.g. a
#: steered sampler from `diffalign.steer.steered_sample_fn`. None samples plainly with `sample`.
SampleFn = Callable[[DiffusionModel, list[str], list[int], SamplerConfig], torch.Tensor]


def sample_layout(
    model: DiffusionModel,
    out_dir: str | Path,
    sampler: SamplerConfig,
    metadata: list[Metadata] | None = None,
    samples_per_prompt: int = 4,
    batch_size: int = 64,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
    sample_fn: SampleFn | None = None,
) -> Path:
    """Write `samples_per_prompt` samples of every prompt in GenEval's layout under `out_dir`.

    Sample j of prompt i uses seed `seed + i * samples_per_prompt + j`, so a folder is reproducible
    and independent of the batch size.
    """
    lines = metadata if metadata is not None else load_shapeseval()
    out = Path(out_dir)
    jobs = [(i, j) for i in range(len(lines)) for j in range(samples_per_prompt)]
    images: dict[int, list] = {}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        prompts = [lines[i]["prompt"] for i, _ in chunk]
        seeds = [seed + i * samples_per_prompt + j for i, j in chunk]
        if sample_fn is None:
            with torch.no_grad():
                batch_images = sample(model, prompts, config=sampler, seeds=seeds).images
        else:
            batch_images = sample_fn(model, prompts, seeds, sampler)
        for (i, _), image in zip(chunk, to_uint8(batch_images)):
            images.setdefault(i, []).append(image)
            if len(images[i]) == samples_per_prompt:
                write_prompt_folder(out, i, lines[i], images.pop(i))
        if on_batch is not None:
            on_batch(min(start + batch_size, len(jobs)), len(jobs))
    return out


def evaluate_on_shapeseval(
    model: DiffusionModel,
    out_dir: str | Path,
    sampler: SamplerConfig,
    samples_per_prompt: int = 4,
    batch_size: int = 64,
    seed: int = 0,
    metadata: list[Metadata] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    sample_fn: SampleFn | None = None,
) -> dict:
    """Sample (with `sample_fn` if given), score, and write `out_dir/results.json`; returns the results
    (with timings)."""
    out = Path(out_dir)
    t0 = time.time()
    sample_layout(model, out, sampler, metadata, samples_per_prompt, batch_size, seed, on_batch, sample_fn)
    t1 = time.time()
    results = score_folder(out)
    results["timing"] = {"sampling_s": t1 - t0, "scoring_s": time.time() - t1}
    results["sampler"] = sampler.__dict__
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
