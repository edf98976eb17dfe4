"""How well the differentiable relaxation of the grader (`shapes:faithfulness-soft`) agrees with it.

1. Renderings of the world with the wrong prompt (each image scored against the next image's prompt,
   so some hold by chance): AUC of the relaxation against the grader's verdict.
2. Samples of `--model` on ShapesEval prompts (`--prompts` prompts x `--seeds` seeds, DDIM eta 0, 8 steps,
   guidance 3): AUC against the verdict, overall and per task; Spearman correlation with the grader's
   partial score; and best-of-`--seeds` selection: the accuracy of the sample the relaxation prefers
   per prompt, against the grader's partial score's choice and the oracle.
3. Cost: seconds per call (forward and backward) on a batch of 16 images, one thread, beside the
   grader's (forward only, it has no backward).

    python benchmarks/soft_faithfulness.py --out bench_soft.json           # ~2 min on 2 cores
    python benchmarks/soft_faithfulness.py --prompts 8 --seeds 2 --renderings 32 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torchmetrics.functional.classification import binary_auroc

from diffalign.diffusion import SamplerConfig
from diffalign.diffusion.sampling import sample
from diffalign.models.registry import load_model
from diffalign.rewards.gold import ShapesFaithfulness
from diffalign.rewards.soft_faithfulness import SoftFaithfulness
from diffalign.world import ShapesGenerator, load_shapeseval


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve of the scores for the verdict; None without both kinds of image."""
    if labels.min() == labels.max():
        return None
    return float(binary_auroc(scores.float(), labels.long()))


def per_call_seconds(fn, images: torch.Tensor, prompts: list[str], backward: bool, repeats: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        x = images.clone().requires_grad_(backward)
        out = fn(x, prompts)
        if backward:
            out.sum().backward()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="base")
    parser.add_argument("--prompts", type=int, default=64, help="ShapesEval prompts sampled")
    parser.add_argument("--seeds", type=int, default=4, help="samples per prompt")
    parser.add_argument("--renderings", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    soft, gold, partial = SoftFaithfulness(), ShapesFaithfulness(), ShapesFaithfulness(partial=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    world = ShapesGenerator().sample(args.renderings, torch.Generator().manual_seed(args.seed))
    shifted = world.prompts[1:] + world.prompts[:1]
    verdict = gold(world.images, shifted)
    results["renderings"] = {
        "own_prompt_mean": float(soft(world.images, world.prompts).mean()),
        "wrong_prompt_auc": auc(soft(world.images, shifted), verdict),
        "wrong_prompt_correct_share": float(verdict.mean()),
    }

    metadata = load_shapeseval()
    rng = np.random.default_rng(args.seed)
    chosen = [metadata[i] for i in rng.choice(len(metadata), args.prompts, replace=False)]
    prompts = [m["prompt"] for m in chosen]
    model = load_model(args.model)
    sampler = SamplerConfig(num_steps=8, guidance_scale=3.0, eta=0.0)
    verdicts, partials, softs = [], [], []
    for s in range(args.seeds):
        with torch.no_grad():
            seeds = [args.seed + s * 10_000 + i for i in range(len(prompts))]
            images = sample(model, prompts, config=sampler, seeds=seeds).images
        verdicts.append(gold(images, prompts))
        partials.append(partial(images, prompts))
        softs.append(soft(images, prompts).detach())
    g, p, r = torch.stack(verdicts, 1), torch.stack(partials, 1), torch.stack(softs, 1)  # [prompts, seeds]
    by_task = {}
    for task in dict.fromkeys(m["tag"] for m in chosen):
        rows = torch.tensor([m["tag"] == task for m in chosen])
        by_task[task] = {"accuracy": float(g[rows].mean()), "auc": auc(r[rows].flatten(), g[rows].flatten())}
    results["samples"] = {
        "accuracy": float(g.mean()),
        "auc": auc(r.flatten(), g.flatten()),
        "spearman_with_partial": float(spearmanr(r.flatten(), p.flatten()).correlation),
        f"best_of_{args.seeds}_by_soft": float(g.gather(1, r.argmax(1, keepdim=True)).mean()),
        f"best_of_{args.seeds}_by_partial": float(g.gather(1, p.argmax(1, keepdim=True)).mean()),
        f"best_of_{args.seeds}_oracle": float(g.max(1).values.mean()),
        "by_task": by_task,
    }
    batch = world.images[:16]
    results["seconds_per_16_images"] = {
        "soft_forward_backward": per_call_seconds(soft, batch, world.prompts[:16], backward=True),
        "grader_forward": per_call_seconds(gold, batch, world.prompts[:16], backward=False),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
