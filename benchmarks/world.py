"""Benchmark of the Shapes world: generator throughput and detector accuracy.

    python benchmarks/world.py [--images 1200] [--threads 2]

Measures, on this machine:
- training-set generation throughput (layout + render, examples/s) at several batch sizes, against
  rendering the same scenes one at a time (the baseline a per-image renderer would give);
- the detector's accuracy per GenEval task on rendered ground truth: clean, with Gaussian noise
  (sigma 0.05 of the value range), with a slight blur (Gaussian, sigma 0.6 px) and with both;
- agreement with the truth on images drawn by an independent PIL program at several sizes;
- the detector's speed (ms per image).
Prints a markdown report (the tables in docs/world.md come from it).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.world.pil_drawer import draw_prompt

from diffalign.world.dataset import ShapesGenerator
from diffalign.world.detector import load_image
from diffalign.world.geneval import score_image
from diffalign.world.grammar import all_metadata
from diffalign.world.palette import CATEGORIES
from diffalign.world.render import render_batch


def generator_throughput(batch_sizes: list[int], total: int) -> list[tuple[int, float]]:
    gen = ShapesGenerator()
    rows = []
    for b in batch_sizes:
        g = torch.Generator().manual_seed(0)
        gen.sample(b, g)  # warm-up
        start = time.perf_counter()
        done = 0
        while done < total:
            gen.sample(b, g)
            done += b
        rows.append((b, done / (time.perf_counter() - start)))
    return rows


def one_at_a_time(n: int) -> float:
    gen = ShapesGenerator()
    batch = gen.sample(n, torch.Generator().manual_seed(1))
    start = time.perf_counter()
    for i in range(n):
        render_batch(batch.scenes.select(slice(i, i + 1)))
    return n / (time.perf_counter() - start)


def detector_accuracy(n_per_task: int, seed: int = 0) -> tuple[dict[str, dict[str, float]], float]:
    gen = ShapesGenerator()
    rng = np.random.default_rng(seed)
    by_tag = {tag: [i for i, m in enumerate(gen.metadata) if m["tag"] == tag] for tag in CATEGORIES}
    ids = torch.tensor(
        [random.Random(seed + k).choice(by_tag[tag]) for tag in CATEGORIES for k in range(n_per_task)]
    )
    scenes = gen.scenes_for(ids, torch.Generator().manual_seed(seed))
    images = gen.render(scenes).permute(0, 2, 3, 1).double().numpy()
    table: dict[str, dict[str, float]] = {}
    seconds, count = 0.0, 0
    for condition in ("clean", "noise", "blur", "noise+blur"):
        correct: dict[str, list[bool]] = {tag: [] for tag in CATEGORIES}
        for pid, image in zip(ids.tolist(), images):
            if "noise" in condition:
                image = np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1)
            if "blur" in condition:
                image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0))
            meta = gen.metadata[pid]
            start = time.perf_counter()
            verdict = score_image(image, meta)
            seconds += time.perf_counter() - start
            count += 1
            correct[meta["tag"]].append(verdict.correct)
        table[condition] = {tag: float(np.mean(v)) for tag, v in correct.items()}
    return table, 1000 * seconds / count


def pil_agreement(n_per_task: int) -> dict[str, float]:
    out = {}
    rng = random.Random(7)
    for size, resize in ((32, None), (64, None), (64, 32), (128, 32), (256, 32)):
        agree = []
        for k in range(n_per_task * len(CATEGORIES)):
            meta = rng.choice(all_metadata(CATEGORIES[k % len(CATEGORIES)]))
            agree.append(score_image(load_image(draw_prompt(meta, size, seed=k), resize), meta).correct)
        out[f"{size}px" + (f" -> {resize}px" if resize else " (native)")] = float(np.mean(agree))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1200, help="images per condition in the accuracy test")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"# Shapes-world benchmark ({args.threads} threads, torch {torch.__version__})\n")
    print("## Training-set generator (layout + render, 32x32)\n")
    baseline = one_at_a_time(500)
    print("| batch | examples/s | vs one at a time |\n|---|---|---|")
    print(f"| 1 (baseline) | {baseline:,.0f} | 1.0x |")
    for b, rate in generator_throughput([256, 1024, 4096], total=20000):
        print(f"| {b} | {rate:,.0f} | {rate / baseline:.0f}x |")

    n_per_task = max(1, args.images // len(CATEGORIES))
    table, ms = detector_accuracy(n_per_task)
    print(f"\n## Detector: images read fully right ({n_per_task} per task and condition)\n")
    print("| condition | " + " | ".join(CATEGORIES) + " |\n|---|" + "---|" * len(CATEGORIES))
    for condition, accs in table.items():
        print(f"| {condition} | " + " | ".join(f"{accs[t]:.3f}" for t in CATEGORIES) + " |")
    print(f"\nDetector speed: {ms:.1f} ms per image (one process).\n")

    print("## Images drawn by an independent program (PIL, aliased, isosceles triangles)\n")
    print("| drawn at | verdicts agreeing with the truth |\n|---|---|")
    for name, value in pil_agreement(max(1, n_per_task // 2)).items():
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
