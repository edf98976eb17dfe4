"""Benchmark of reward backpropagation on the Shapes world (issue 5, the reward-backprop half).

1. The differentiable reward: a learned reward model folder (`--reward DIR`), the differentiable
   relaxation of the grader (`--reward shapes:faithfulness-soft`, `rewards.soft_faithfulness`), or, with
   `--train-surrogate STEPS`, a differentiable surrogate of faithfulness trained here: the learned reward
   model of `diffalign.rewards.learned` trained for STEPS steps by world-caption matching only
   (`bt_training.pretrain_matching`: Bradley-Terry pairs preferring a rendering of the prompt to a
   rendering of another prompt, half of them near misses). It never sees the gold reward or a rater.
2. For each method (alignprop, draft, draft-lv, refl), fine-tune `--model` on world prompts with
   `train_backprop`, and every `--eval-every` steps measure the gold faithfulness accuracy (the share
   of images whose every clause holds, `gold-faithfulness`) and the proxy reward on a fixed set of
   ShapesEval prompts with fixed seeds (DDIM, eta 0, the training steps and guidance).
3. Curves: gold accuracy against reward queries (training queries, all processes) and against training
   wall time (evaluation time left out). Writes OUT/results.json and prints a markdown table.

    nice python benchmarks/reward_backprop.py --train-surrogate 600 --methods draft --steps 60 --out bench_bp/
    python benchmarks/reward_backprop.py --reward rm/ --methods alignprop draft draft-lv refl --out bench_bp/
    nice python benchmarks/reward_backprop.py --reward shapes:faithfulness-soft --steps 30 --out bench_bp/
    python benchmarks/reward_backprop.py --train-surrogate 20 --steps 2 --eval-prompts 4 --out /tmp/bp
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffalign.align.backprop_config import BACKPROP_METHODS, BackpropConfig
from diffalign.align.prompts import load_prompt_source
from diffalign.align.reward_backprop import train_backprop
from diffalign.align.runtime import RuntimeConfig
from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.evaluate.stats import bootstrap_mean_ci
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE
from diffalign.rewards.registry import load_reward


def train_surrogate(steps: int, out: Path) -> Path:
    """A learned reward model trained by world-caption matching only; saved to `out`."""
    from diffalign.rewards.bt_training import RewardTrainConfig, pretrain_matching
    from diffalign.rewards.learned import build_reward_model
    from diffalign.world.dataset import ShapesGenerator

    world = ShapesGenerator()
    config = RewardTrainConfig(seed=0)
    model = build_reward_model(
        [m["prompt"] for m in world.metadata], config.model, name="faithfulness-surrogate"
    )
    model.train()
    pretrain_matching(model, steps, config, torch.device("cpu"))
    model.eval()
    model.save(out)
    return out


class Evaluator:
    """Gold accuracy and proxy reward of a model on fixed ShapesEval prompts and seeds."""

    def __init__(self, reward, count: int, sampler: SamplerConfig, seed: int = 1234) -> None:
        self.prompts = load_prompt_source("shapeseval").sample(count, torch.Generator().manual_seed(seed))
        self.seeds = list(range(seed, seed + count))
        self.sampler = sampler
        self.reward = reward
        self.gold = load_reward("gold-faithfulness")

    def __call__(self, model) -> dict:
        with torch.no_grad():
            images = sample(model, self.prompts, config=self.sampler, seeds=self.seeds).images
            gold = self.gold(images, self.prompts)
            proxy = self.reward(images, self.prompts)
        lo, hi = bootstrap_mean_ci(gold.cpu().numpy())
        return {"gold_accuracy": float(gold.mean()), "gold_ci": [lo, hi], "proxy_reward": float(proxy.mean())}


def run_method(method: str, args, reward, evaluator: Evaluator, base_eval: dict) -> dict:
    config = BackpropConfig(
        method=method,
        model=args.model,
        reward=str(args.reward),
        gold="none",
        num_steps=args.num_steps,
        guidance_scale=args.guidance,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        draft_k=args.draft_k,
        log_every=args.eval_every,
        checkpoint_every=0,
        log_kl=False,
        log_with="none",
        runtime=RuntimeConfig(device="cpu", seed=args.seed),
    )
    curve = [{"step": 0, "reward_queries": 0, "train_seconds": 0.0, **base_eval}]
    clock = {"start": time.perf_counter(), "eval": 0.0}
    queries = {}

    def on_log(line: dict) -> None:
        queries[line["step"]] = line["reward_queries"]

    def on_step(model, done: int) -> None:
        if done % args.eval_every and done != args.steps:
            return
        t0 = time.perf_counter()
        point = evaluator(model)
        clock["eval"] += time.perf_counter() - t0
        seconds = time.perf_counter() - clock["start"] - clock["eval"]
        point.update(step=done, reward_queries=queries.get(done), train_seconds=seconds)
        curve.append(point)
        print(json.dumps({"method": method, **point}), flush=True)

    train_backprop(config, args.out / method, on_log=on_log, on_step=on_step, reward=reward)
    best = max(curve, key=lambda p: p["gold_accuracy"])
    return {"method": method, "curve": curve, "best": best, "final": curve[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reward", help="a differentiable reward: a learned reward-model folder or shapes:faithfulness-soft"
    )
    parser.add_argument("--train-surrogate", type=int, default=0, help="train a matching surrogate (steps)")
    parser.add_argument("--methods", nargs="+", default=["draft"], choices=BACKPROP_METHODS)
    parser.add_argument("--model", default="base")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--draft-k", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-prompts", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.train_surrogate:
        args.reward = train_surrogate(args.train_surrogate, args.out / "surrogate")
    if args.reward is None:
        parser.error("give --reward DIR|SPEC or --train-surrogate STEPS")
    reward = load_reward(str(args.reward))
    sampler = SamplerConfig(sampler="ddim", num_steps=args.num_steps, eta=0.0, guidance_scale=args.guidance)
    evaluator = Evaluator(reward, args.eval_prompts, sampler)
    from diffalign.models.registry import load_model

    base_eval = evaluator(load_model(args.model))
    print(json.dumps({"base": base_eval}), flush=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "base": base_eval, "methods": []}
    for method in args.methods:
        results["methods"].append(run_method(method, args, reward, evaluator, base_eval))
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    results["seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("| method | gold accuracy: base -> final (best) | gain (points) | reward queries | train s |")
    print("|---|---|---|---|---|")
    for r in results["methods"]:
        final, best = r["final"], r["best"]
        gain = 100 * (final["gold_accuracy"] - base_eval["gold_accuracy"])
        print(
            f"| {r['method']} | {base_eval['gold_accuracy']:.3f} -> {final['gold_accuracy']:.3f} "
            f"({best['gold_accuracy']:.3f} at {best['reward_queries']} queries) | {gain:+.1f} | "
            f"{final['reward_queries']} | {final['train_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
