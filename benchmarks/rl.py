"""Benchmark of online RL fine-tuning (DDPO / GRPO / Flow-GRPO / DiffusionNFT) on the Shapes world (issue 5).

Trains the base model against the gold faithfulness reward (`shapes:faithfulness`, GenEval's verdict:
1 when every clause of the prompt holds) for a wall-clock budget, and evaluates it on a fixed third of
ShapesEval (every third line: 100 prompts over the six tasks, `--eval-samples` images each, the
evaluation sampler of `diffalign eval`: 20 steps, DDIM eta 0 or the flow Euler ODE, with the run's own
`guidance_scale`, 3 by default) before training and every `--eval-every` epochs. Evaluation time is not
counted as training time. `--eval-guidance G1,G2,...` judges with other guidance scales too: the first
is the curve's `overall`, every one is recorded under `by_guidance` (a run trained CFG-free,
`guidance_scale=1`, is then read both against the base sampled the same way and against the guided
base).

The budget `--minutes` is in 2-core CPU-minutes: the process's CPU time over all its threads, halved,
which is the wall time on two dedicated cores and does not depend on other work sharing the machine.
The curve records wall seconds too.

Acceptance (issue 5): ShapesEval overall accuracy (mean of the task accuracies) rises by >= 25 points
within 30 CPU-minutes on 2 cores.

    nice python benchmarks/rl.py --model base --method grpo --minutes 30 --out bench_rl/base
    python benchmarks/rl.py --model base --minutes 2 --eval-every 2 --out /tmp/bench_rl   # a smoke run

Writes curve.json (gold accuracy against reward queries and training seconds) and the run folder under
--out, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from diffalign.align.config_io import load_config, to_dict
from diffalign.align.nft import train_nft
from diffalign.align.nft_config import NFTConfig
from diffalign.align.pg_config import PGConfig
from diffalign.align.policy_gradient import train_pg
from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.evaluate.failure_modes import failure_modes
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE
from diffalign.rewards.gold import ShapesFaithfulness
from diffalign.world.shapeseval import load_shapeseval


class BudgetSpentError(Exception):
    """Raised from the epoch callback to end training when the wall-time budget is spent."""


def eval_lines(stride: int = 3) -> list[dict]:
    """Every `stride`-th ShapesEval line (the set is grouped by task, so every task is represented)."""
    return load_shapeseval()[::stride]


def gold_accuracy(
    model, lines: list[dict], samples: int, batch: int = 50, guidance: float = DEFAULT_GUIDANCE_SCALE
) -> dict:
    """GenEval-style accuracy of `model` on `lines` sampled with classifier-free guidance `guidance`:
    per task, overall as the mean of the tasks, and each task's failure modes
    (`diffalign.evaluate.failure_modes`: share of its images per mode)."""
    sampler = SamplerConfig.for_prediction_type(
        model.prediction_type, num_steps=20, guidance_scale=guidance, eta=0.0
    )
    if sampler.sampler == "flow_sde":
        sampler = SamplerConfig(sampler="flow_euler", num_steps=20, guidance_scale=guidance)
    jobs = [(i, j) for i in range(len(lines)) for j in range(samples)]
    judge = ShapesFaithfulness()
    records = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        prompts = [lines[i]["prompt"] for i, _ in chunk]
        seeds = [10_000 + i * samples + j for i, j in chunk]
        with torch.no_grad():
            images = sample(model, prompts, config=sampler, seeds=seeds).images
        for (i, _), verdict in zip(chunk, judge.verdicts(images, prompts)):
            records.append({"tag": lines[i]["tag"], **verdict.to_dict()})
    summary = failure_modes(records)  # per task: images, failed images, failure-mode shares
    tasks = {tag: 1.0 - entry["failed"] / entry["images"] for tag, entry in summary.items()}
    modes = {tag: entry["modes"] for tag, entry in summary.items()}
    return {"overall": sum(tasks.values()) / len(tasks), "tasks": tasks, "failure_modes": modes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--method", default="grpo", choices=["ddpo", "dpok", "grpo", "nft"])
    parser.add_argument(
        "--minutes",
        type=float,
        default=30.0,
        help="training budget in 2-core CPU-minutes: the process's CPU time / 2 (robust to a shared machine)",
    )
    parser.add_argument("--eval-every", type=int, default=5, help="epochs between evaluations")
    parser.add_argument("--eval-samples", type=int, default=2, help="images per evaluation prompt")
    parser.add_argument(
        "--eval-guidance",
        default=None,
        help="evaluation guidance scales, comma-separated (default: the run's own); the first is 'overall'",
    )
    parser.add_argument("--config", type=Path, default=None, help="a YAML of PGConfig (NFTConfig) fields")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="PGConfig (NFTConfig for nft) overrides key=value")
    args = parser.parse_args()

    defaults = [
        f"method={args.method}",
        f"model={args.model}",
        "reward=shapes:faithfulness",
        "gold=none",
        "prompts=world",
        "epochs=1000",
        "checkpoint_every=0",
        "grid_every=10",
        "log_with=none",
        "runtime.device=cpu",
    ]
    nft = args.method == "nft"
    config = load_config(NFTConfig if nft else PGConfig, args.config, [*defaults, *args.overrides])
    trainer = train_nft if nft else train_pg
    try:
        guidances = (
            [float(g) for g in args.eval_guidance.split(",")]
            if args.eval_guidance
            else [config.guidance_scale]
        )
    except ValueError:
        parser.error(
            f"--eval-guidance {args.eval_guidance!r}: expected numbers separated by commas, e.g. 1,3"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    lines = eval_lines()
    budget = args.minutes * 60
    curve: list[dict] = []
    # Training time excludes evaluations: wall seconds, and CPU seconds of this process over all threads.
    clock = {"wall": 0.0, "cpu": 0.0, "wall0": time.perf_counter(), "cpu0": time.process_time()}

    def pause() -> None:
        clock["wall"] += time.perf_counter() - clock["wall0"]
        clock["cpu"] += time.process_time() - clock["cpu0"]

    def unpause() -> None:
        clock["wall0"], clock["cpu0"] = time.perf_counter(), time.process_time()

    def evaluate(model, epoch: int) -> None:
        pause()
        results = {g: gold_accuracy(model, lines, args.eval_samples, guidance=g) for g in guidances}
        result = {**results[guidances[0]], "guidance": guidances[0]}
        if len(guidances) > 1:
            result["by_guidance"] = {str(g): r["overall"] for g, r in results.items()}
        point = {
            "epoch": epoch,
            "reward_queries": epoch * config.samples_per_epoch,
            "train_wall_seconds": round(clock["wall"], 1),
            "train_cpu_seconds": round(clock["cpu"], 1),
            "train_2core_minutes": round(clock["cpu"] / 120, 2),
            **result,
        }
        curve.append(point)
        print(json.dumps(point), flush=True)
        record = {"config": to_dict(config), "curve": curve}
        (args.out / "curve.json").write_text(json.dumps(record, indent=1))
        unpause()

    from diffalign.models.registry import load_model

    evaluate(load_model(config.model), 0)

    def spent() -> float:
        """2-core seconds of training so far: CPU seconds over all threads / 2."""
        return (clock["cpu"] + time.process_time() - clock["cpu0"]) / 2

    def on_epoch(model, epoch: int) -> None:
        over = spent() >= budget
        if epoch % args.eval_every == 0 or over:
            evaluate(model, epoch)
        if over:
            raise BudgetSpentError

    with contextlib.suppress(BudgetSpentError):
        trainer(config, args.out / "run", on_epoch=on_epoch, on_log=lambda line: print(json.dumps(line)))
    first, last = curve[0], curve[-1]
    best = max(curve, key=lambda p: p["overall"])
    print("\n| model | method | epochs | reward queries | 2-core CPU min | base | final | best | gain |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {config.model} | {config.method} | {last['epoch']} | {last['reward_queries']} | "
        f"{last['train_2core_minutes']:.1f} | {first['overall']:.3f} | {last['overall']:.3f} | "
        f"{best['overall']:.3f} | {100 * (last['overall'] - first['overall']):+.1f} pts |"
    )


if __name__ == "__main__":
    main()
