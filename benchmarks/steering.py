"""Benchmark of test-time steering on the Shapes world (issue 7's acceptance).

Model: `base` (epsilon) with its default sampler (DDIM, eta 0, classifier-free guidance 3) at `--steps`
steps; FK steering, SVDD and DNO need a stochastic sampler and use DDIM with eta 1 (the same model and
steps). Prompts: `--per-tag` ShapesEval prompts from each of `--tags`, each sampled `--samples` times
(different seeds), so diversity can be measured within a prompt.

Steering reward (the proxy): `shapes:faithfulness-partial`, the fraction of the prompt's GenEval
clauses the world's detector finds; a black box. It is a denser version of the very check that grades
the result, so these rows are a best case for steering (no proxy/gold gap). Gradient methods (reward
guidance, DNO's gradient mode) need a differentiable reward: `--grad-reward SPEC` names one (a reward
model folder, or `shapes:faithfulness-soft`, the differentiable relaxation of the grader: the gradient
methods' best case, as the partial score is the black-box methods'), or `--train-grad-reward STEPS`
trains a small one on the world's captioned renderings only (`pretrain_matching`: it never sees a
verdict of the graders), a real proxy; add their rows with `--only ...,guidance,dno`.
`fk-adaptive` is FK with the difference potential and resampling only when the ESS drops under K/2
(the reference's adaptive setting).

For each method and budget (1x, 4x, 8x the NFEs of one plain sample; 1x is plain sampling for every
method that has a 1x setting) the table reports:
- accuracy: ShapesEval/GenEval correctness (`shapes:faithfulness`, every clause holds), mean over images;
- gold utility: the simulated rater panel's pooled utility (`shapes:utility`), which also weighs quality;
- proxy: the steering reward;
- diversity: mean pixel L2 distance between the samples of the same prompt (per-image RMS);
- NFE/prompt (forward + 2 x backward), reward calls per image, and wall time.

    nice python benchmarks/steering.py --out bench_steering/          # the default run (~11 min, 2 cores)
    nice python benchmarks/steering.py --train-grad-reward 300 --only guidance,dno,fk-adaptive --out b2/
    python benchmarks/steering.py --per-tag 1 --tags position --steps 4 --budgets 4 --out /tmp/s  # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE
from diffalign.models.registry import load_model
from diffalign.rewards.registry import load_reward
from diffalign.steer import make_config, plain_nfe, run_method
from diffalign.world.shapeseval import load_shapeseval

#: (row name, method, sampler kind, options) benchmarked at each budget above 1x.
FK_SCHEDULE = {"lam": 10.0, "resample_every": 2, "resample_start": 2}
#: key -> (row name, method, sampler kind, options); --only picks rows by key.
METHODS = {
    "bon": ("best-of-N", "bon", "default", {}),
    "search": ("zero-order search", "search", "default", {"mode": "zero_order", "neighbors": 4}),
    "fk": ("FK (max potential)", "fk", "stochastic", {"potential": "max", **FK_SCHEDULE}),
    "fk-adaptive": (
        "FK (difference, ESS < K/2)",
        "fk",
        "stochastic",
        {"potential": "difference", "ess_threshold": 0.5, **FK_SCHEDULE},
    ),
    "svdd": ("SVDD", "svdd", "stochastic", {}),
    "dno-zo": ("DNO zero-order", "dno", "stochastic", {"mode": "zero_order", "perturbations": 2, "lr": 0.1}),
}
GRAD_METHODS = {
    "guidance": ("reward guidance", "guidance", "default", {"scale": 0.05}),
    "dno": ("DNO gradient", "dno", "stochastic", {"mode": "gradient", "lr": 0.1}),
}
DEFAULT_ROWS = "bon,search,fk,svdd,dno-zo"


def pick_prompts(tags: list[str], per_tag: int) -> list[str]:
    lines = load_shapeseval()
    out = []
    for tag in tags:
        prompts = [line["prompt"] for line in lines if line["tag"] == tag]
        if not prompts:
            raise SystemExit(f"--tags: no ShapesEval prompts tagged {tag!r}")
        stride = max(len(prompts) // per_tag, 1)
        out.extend(prompts[::stride][:per_tag])
    return out


def diversity(images: torch.Tensor, samples: int) -> float:
    """Mean pairwise RMS pixel distance between the `samples` images of each prompt (prompt-major)."""
    groups = images.view(-1, samples, *images.shape[1:]).flatten(2)
    dists = torch.cdist(groups, groups) / groups.shape[-1] ** 0.5
    pairs = samples * (samples - 1)
    return float(dists.sum(dim=(1, 2)).mean() / pairs) if pairs else 0.0


def grade(images, prompts, samples, graders) -> dict:
    return {
        "accuracy": float(graders["accuracy"](images, prompts).mean()),
        "gold_utility": float(graders["gold"](images, prompts).mean()),
        "proxy": float(graders["proxy"](images, prompts).mean()),
        "diversity": diversity(images, samples),
    }


def train_grad_reward(folder: Path, steps: int, seed: int) -> Path:
    """A small learned reward trained only on the world's captioned renderings (`pretrain_matching`):
    a differentiable proxy of faithfulness that never sees the graders' verdicts."""
    from diffalign.rewards.bt_training import RewardTrainConfig, pretrain_matching
    from diffalign.rewards.learned import build_reward_model
    from diffalign.world.dataset import ShapesGenerator

    config = RewardTrainConfig(seed=seed, pretrain_steps=steps)
    model = build_reward_model([m["prompt"] for m in ShapesGenerator().metadata], config.model, seed=seed)
    start = time.perf_counter()
    pretrain_matching(model, steps, config, torch.device("cpu"))
    model.eval()
    print(f"trained the gradient proxy for {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return model.save(folder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench_steering"))
    parser.add_argument("--tags", default="counting,position,color_attr")
    parser.add_argument("--per-tag", type=int, default=1)
    parser.add_argument("--samples", type=int, default=2, help="samples per prompt (seeds)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument(
        "--budgets", default="4,8", help="multiples of a plain sample's NFEs (1x is always run)"
    )
    parser.add_argument("--proxy", default="shapes:faithfulness-partial")
    parser.add_argument("--grad-reward", default=None, help="a differentiable reward for guidance and DNO")
    parser.add_argument(
        "--train-grad-reward",
        type=int,
        default=0,
        help="train a differentiable proxy for this many world-caption steps (it never sees a label of the "
        "graders) and use it as --grad-reward",
    )
    parser.add_argument(
        "--only",
        default=DEFAULT_ROWS,
        help=f"rows to run, from {sorted(METHODS) + sorted(GRAD_METHODS)} (gradient rows need --grad-reward)",
    )
    parser.add_argument(
        "--guidance-strength",
        type=float,
        default=GRAD_METHODS["guidance"][3]["scale"],
        help="reward guidance's scale (choose it on other seeds or prompts than the ones reported)",
    )
    parser.add_argument(
        "--guidance-schedule",
        default="constant",
        choices=["constant", "increasing", "decreasing"],
        help="reward guidance's scale schedule over the steps",
    )
    parser.add_argument(
        "--guidance-gradient",
        default="denoiser",
        choices=["denoiser", "x0"],
        help="reward guidance's gradient: through the denoiser (DPS) or at the x0 prediction only",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = load_model("base")
    base_prompts = pick_prompts(args.tags.split(","), args.per_tag)
    prompts = [p for p in base_prompts for _ in range(args.samples)]
    samplers = {
        "default": SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance, eta=0.0),
        "stochastic": SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance, eta=1.0),
    }
    plain = plain_nfe(samplers["default"])
    proxy = load_reward(args.proxy)
    graders = {
        "accuracy": load_reward("shapes:faithfulness"),
        "gold": load_reward("shapes:utility"),
        "proxy": proxy,
    }
    if args.train_grad_reward:
        args.grad_reward = str(train_grad_reward(args.out / "grad_reward", args.train_grad_reward, args.seed))
    methods = dict(METHODS)
    if args.grad_reward:
        for key, (name, method, kind, options) in GRAD_METHODS.items():
            if key == "guidance":
                options = {
                    **options,
                    "scale": args.guidance_strength,
                    "schedule": args.guidance_schedule,
                    "gradient": args.guidance_gradient,
                }
            methods[key] = (name, method, kind, {**options, "_reward": args.grad_reward})
    unknown = [key for key in args.only.split(",") if key not in methods]
    if unknown:
        raise SystemExit(
            f"--only: no rows {unknown} (gradient rows need --grad-reward); rows: {sorted(methods)}"
        )
    selected = [methods[key] for key in args.only.split(",")]
    rows = []

    for sampler in samplers.values():
        start = time.perf_counter()
        with torch.no_grad():
            seeds = [args.seed + i for i in range(len(prompts))]
            images = sample(model, prompts, config=sampler, seeds=seeds).images
        rows.append(
            {
                "method": f"plain (eta {sampler.eta:g})",
                "budget": 1,
                "nfe_per_prompt": plain,
                "reward_calls": 0,
                "seconds": time.perf_counter() - start,
                **grade(images, prompts, args.samples, graders),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    for multiple in [int(b) for b in args.budgets.split(",")]:
        for name, method, kind, options in selected:
            options = dict(options)
            reward = load_reward(options.pop("_reward")) if "_reward" in options else proxy
            config = make_config(method, multiple * plain, samplers[kind], seed=args.seed, **options)
            result = run_method(method, model, prompts, reward, samplers[kind], config)
            per = result.usage.per_prompt(len(prompts))
            rows.append(
                {
                    "method": name,
                    "budget": multiple,
                    "nfe_per_prompt": per["cost"],
                    "reward_calls": per["reward_calls"],
                    "seconds": result.seconds,
                    "config": vars(config),
                    **grade(result.images, prompts, args.samples, graders),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "prompts": base_prompts,
        "samples": args.samples,
        "steps": args.steps,
        "guidance": args.guidance,
        "proxy": args.proxy,
        "grad_reward": args.grad_reward,
        "threads": args.threads,
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    columns = ["method", "budget", "NFE/prompt", "reward calls/image", "accuracy", "gold utility", "proxy"]
    header = "| " + " | ".join([*columns, "diversity", "wall s"]) + " |"
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget']}x | {r['nfe_per_prompt']:.0f} | {r['reward_calls']:.0f} | "
            f"{r['accuracy']:.3f} | {r['gold_utility']:.3f} | {r['proxy']:.3f} | {r['diversity']:.3f} | "
            f"{r['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
