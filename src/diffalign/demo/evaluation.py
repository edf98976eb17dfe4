"""How the paradigm report evaluates each system: the same ShapesEval prompts and seeds for all.

For every system (the base model, a trained model, or the base model with a steered sampler):
- ShapesEval accuracy per GenEval task and overall (the detector with GenEval's rules), bootstrap CIs;
- the gold faithfulness reward and the proxy (learned) reward, means with bootstrap CIs over prompts;
- the win rate against the base model's images of the same prompts and seeds, judged by the gold
  rater panel (`diffalign.evaluate.winrate.panel_win_rate`);
- diversity: per-prompt variety in the Shapes feature space (`diffalign.evaluate.features`);
- a grid of samples per task, framed green when judged correct and red when wrong.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.evaluate.diversity import per_prompt_variety
from diffalign.evaluate.features import ShapesFeatureNet, extract_features
from diffalign.evaluate.report import image_grid
from diffalign.evaluate.shapeseval_run import SampleFn, evaluate_on_shapeseval
from diffalign.evaluate.suite import reward_summary
from diffalign.evaluate.winrate import win_rate_from_scores
from diffalign.rewards.protocol import Reward
from diffalign.world.grammar import Metadata
from diffalign.world.raters import ImageFeatures, RaterPanel
from diffalign.world.shapeseval import load_shapeseval

#: Samples shown per task in a grid.
GRID_IMAGES = 12


def eval_metadata(per_task: int, seed: int = 0) -> list[Metadata]:
    """`per_task` ShapesEval prompts of each GenEval task (a seeded draw without replacement)."""
    lines = load_shapeseval()
    by_tag: dict[str, list[Metadata]] = {}
    for line in lines:
        by_tag.setdefault(line["tag"], []).append(line)
    rng = random.Random(seed)
    chosen = []
    for tag in sorted(by_tag):
        pool = by_tag[tag]
        chosen.extend(rng.sample(pool, min(per_task, len(pool))))
    return chosen


@dataclass
class EvalJudges:
    """What every system is measured with (shared, so all systems are judged alike).

    Attributes:
        panel: the gold rater panel (win rates).
        proxy: the learned reward model the methods optimised (None: not reported).
        features: the Shapes feature network (diversity).
    """

    panel: RaterPanel
    proxy: Reward | None
    features: ShapesFeatureNet


@dataclass
class SystemEval:
    """One system's evaluation: the report's `eval` entry, its images and its grid files."""

    summary: dict
    images: Tensor
    prompts: list[str]
    grids: dict[str, str]
    features: ImageFeatures


def system_record(
    name: str,
    method: str,
    paradigm: str,
    evaluation: SystemEval,
    *,
    run_dir: str | None = None,
    feedback: str = "none",
    costs: dict | None = None,
    curves: list[dict] | None = None,
    curve_x: str = "step",
) -> dict:
    """One entry of the report's `systems` list (schema 1, `diffalign.demo.report_html`)."""
    return {
        "name": name,
        "method": method,
        "paradigm": paradigm,
        "run_dir": run_dir,
        "feedback": feedback,
        "costs": costs,
        "eval": evaluation.summary,
        "grids": evaluation.grids,
        "curves": curves or [],
        "curve_x": curve_x,
    }


def _capturing(sample_fn: SampleFn | None, store: list[Tensor]) -> SampleFn:
    """A sampler hook that samples plainly (or with `sample_fn`) and keeps the images in order."""

    def run(model: DiffusionModel, prompts: list[str], seeds: list[int], sampler: SamplerConfig) -> Tensor:
        if sample_fn is None:
            with torch.no_grad():
                images = sample(model, prompts, config=sampler, seeds=seeds).images
        else:
            images = sample_fn(model, prompts, seeds, sampler)
        store.append(images.detach().float().cpu())
        return images

    return run


def _task_grid(records: list[dict], samples_dir: Path, tag: str) -> Image.Image:
    """Samples of one task; a green frame marks images judged correct, a red frame wrong ones."""
    tiles = []
    for record in [r for r in records if r["tag"] == tag][:GRID_IMAGES]:
        image = np.asarray(Image.open(samples_dir / record["file"]).convert("RGB"))
        frame = np.array((40, 170, 60) if record["correct"] else (210, 40, 40), dtype=np.uint8)
        framed = np.broadcast_to(frame, (image.shape[0] + 4, image.shape[1] + 4, 3)).copy()
        framed[2:-2, 2:-2] = image
        tiles.append(framed)
    return image_grid(tiles, cols=6, scale=3)


def _win_rate(
    panel: RaterPanel, features: ImageFeatures, base_features: ImageFeatures, prompts: list[str], seed: int
) -> dict:
    """The panel's win rate against the base images, and how many pairs it prefers each way: a pair is
    a win when a random rater of the panel picks the system's image with probability above one half, a
    tie at exactly one half (e.g. identical images)."""
    probs = panel.preference_prob(features, base_features)
    win = win_rate_from_scores(probs, prompts, "panel", seed=seed).to_dict()
    probs = probs.double()
    ties = (probs - 0.5).abs() < 1e-9
    return {
        "rate": win.pop("win_rate"),
        **win,
        "wins": int(((probs > 0.5) & ~ties).sum()),
        "ties": int(ties.sum()),
        "losses": int(((probs < 0.5) & ~ties).sum()),
    }


def evaluate_system(
    name: str,
    model: DiffusionModel,
    sampler: SamplerConfig,
    metadata: list[Metadata],
    samples_per_prompt: int,
    out: Path,
    judges: EvalJudges,
    *,
    base: SystemEval | None = None,
    sample_fn: SampleFn | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> SystemEval:
    """Sample `model` (steered with `sample_fn` if given) on `metadata` and measure it (module doc).

    Images go to `out/samples/<name>` in GenEval's layout, grids to `out/grids/<name>/<task>.png`.
    Sample j of prompt i has seed `seed + i * samples_per_prompt + j` for every system.
    """
    started = time.perf_counter()
    captured: list[Tensor] = []
    samples_dir = out / "samples" / name
    results = evaluate_on_shapeseval(
        model,
        samples_dir,
        sampler,
        samples_per_prompt,
        batch_size,
        seed,
        metadata=metadata,
        sample_fn=_capturing(sample_fn, captured),
    )
    images = torch.cat(captured)
    prompts = [line["prompt"] for line in metadata for _ in range(samples_per_prompt)]
    # The panel's reading of each image (one detector pass): gold faithfulness is its `correct`
    # (GenEval's verdict, as `gold-faithfulness` computes it) and the win rate compares it with the base's.
    features = judges.panel.features(images, prompts)
    summary: dict = {
        "overall": results["overall"]["score"],
        "overall_ci95": list(results["overall"]["ci95"]),
        "categories": {
            tag: {"accuracy": c["accuracy"], "ci95": list(c["ci95"]), "images": c["images"]}
            for tag, c in results["categories"].items()
        },
        "gold_reward": reward_summary(features.correct.double(), prompts, seed=seed),
        "proxy_reward": None,
        "win_rate": None,
        "diversity": None,
    }
    if judges.proxy is not None:
        with torch.no_grad():
            proxy = judges.proxy(images, prompts).detach().double().cpu()
        summary["proxy_reward"] = reward_summary(proxy, prompts, seed=seed)
    if base is not None:
        summary["win_rate"] = _win_rate(judges.panel, features, base.features, prompts, seed)
    if samples_per_prompt > 1:
        summary["diversity"] = per_prompt_variety(extract_features(images, judges.features), prompts)
    grids = {}
    for tag in results["categories"]:
        path = out / "grids" / name / f"{tag}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _task_grid(results["images"], samples_dir, tag).save(path)
        grids[tag] = str(path.relative_to(out))
    summary["seconds"] = time.perf_counter() - started
    return SystemEval(summary, images, prompts, grids, features)
