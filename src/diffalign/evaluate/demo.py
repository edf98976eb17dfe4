"""`diffalign demo`: the main job on the Shapes world.

This release samples the base model on ShapesEval, scores it with the detector and GenEval's rules,
and writes an HTML report with a grid of samples per task (each marked right or wrong) and the score
table. Later stages of the loop (preferences, reward models, alignment, steering) add their sections.
"""

from __future__ import annotations

import html
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig
from diffalign.evaluate.report import html_page, html_table, image_grid, png_data_uri
from diffalign.evaluate.shapeseval_run import evaluate_on_shapeseval

GRID_IMAGES = 24


def _task_grid(results: dict, samples_dir: Path, tag: str) -> Image.Image:
    """Samples of one task; a green frame marks images judged correct, a red frame wrong ones."""
    tiles = []
    for record in [r for r in results["images"] if r["tag"] == tag][:GRID_IMAGES]:
        image = np.asarray(Image.open(samples_dir / record["file"]).convert("RGB"))
        frame = np.array((40, 170, 60) if record["correct"] else (210, 40, 40), dtype=np.uint8)
        framed = np.broadcast_to(frame, (image.shape[0] + 4, image.shape[1] + 4, 3)).copy()
        framed[2:-2, 2:-2] = image
        tiles.append(framed)
    return image_grid(tiles, cols=8, scale=3)


def run_demo(
    model: DiffusionModel,
    model_name: str,
    out_dir: str | Path,
    sampler: SamplerConfig,
    samples_per_prompt: int = 1,
    seed: int = 0,
    metadata: list[dict] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Sample, score, and write `out_dir/report.html`; returns the report's path."""
    out = Path(out_dir)
    samples = out / "samples"
    start = time.time()
    log(f"sampling ShapesEval with {model_name} ({samples_per_prompt} per prompt, {sampler.num_steps} steps)")
    results = evaluate_on_shapeseval(
        model, samples, sampler, samples_per_prompt=samples_per_prompt, seed=seed, metadata=metadata
    )
    elapsed = time.time() - start
    rows = [
        [tag, f"{c['accuracy']:.3f}", f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]", c["images"]]
        for tag, c in results["categories"].items()
    ]
    o = results["overall"]
    rows.append(
        [
            "overall (mean of tasks)",
            f"{o['score']:.3f}",
            f"[{o['ci95'][0]:.3f}, {o['ci95'][1]:.3f}]",
            results["n_images"],
        ]
    )
    sections = [
        f"<p>Model <code>{html.escape(model_name)}</code>, sampler {html.escape(sampler.sampler)} with "
        f"{sampler.num_steps} steps and guidance {sampler.guidance_scale}; {results['n_images']} images "
        "scored by the Shapes-world detector with GenEval's rules (an image is correct only if every "
        "clause holds).</p>",
        "<h2>ShapesEval score</h2>",
        html_table(["task", "accuracy", "95% CI (bootstrap)", "images"], rows),
        "<h2>Samples per task</h2><p>Green frame: judged correct; red: wrong.</p>",
    ]
    for tag in results["categories"]:
        grid = _task_grid(results, samples, tag)
        sections.append(
            f"<figure><img src='{png_data_uri(grid)}'><figcaption>{html.escape(tag)}</figcaption></figure>"
        )
    timing = results["timing"]
    sections.append(
        "<h2>Cost</h2>"
        + html_table(
            ["stage", "seconds"],
            [
                ["sampling", f"{timing['sampling_s']:.1f}"],
                ["scoring", f"{timing['scoring_s']:.1f}"],
                ["total", f"{elapsed:.1f}"],
            ],
        )
        + f"<p>{html.escape(platform.processor() or platform.machine())}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.</p>"
    )
    report = out / "report.html"
    report.write_text(html_page("diffalign demo: the base model on ShapesEval", sections), encoding="utf-8")
    log(f"ShapesEval overall {o['score']:.3f} [{o['ci95'][0]:.3f}, {o['ci95'][1]:.3f}] in {elapsed:.0f} s")
    return report
