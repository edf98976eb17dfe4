"""Benchmark of offline Diffusion-DPO on the Shapes world (issue 6's acceptance).

For each parameterisation (`base`: epsilon, `base-flow`: rectified flow) and each data size:
1. simulate preference pairs: two samples of the base model per prompt, labelled by the simulated
   rater panel (`diffalign.prefs.simulate.simulate_preferences`, seed 0; a store is extended, never
   re-sampled, so the 500-pair set is the first 500 pairs of the 8,000-pair set);
2. fine-tune the base model with Diffusion-DPO on the first N pairs (ties left out);
3. judge: sample the tuned model and the base on the ShapesEval prompts with the *same* seeds, and
   ask the gold rater panel which it prefers (`RaterPanel.preference_prob`, the pooled panel's expected
   choice); the win rate is the mean over prompts, with a 95% bootstrap interval over prompts. The
   GenEval-style accuracy (share of images whose every clause holds) of both is reported beside it.

Acceptance: with 2,000 pairs the win rate is >= 65% with the interval above 50%, for both models.

Diagnostics (docs/align.md, "What the pairs teach, and at which noise level"):
- `--store PATH` trains on an existing store's pairs (simulated with keys simulated:0:<i>) instead of
  simulating a new one;
- `--labels` relabels the pairs before training: `panel` (the stored, noisy choices: the benchmark),
  `gold` (the sign of the pooled gold utility, no rater noise), or one feature the panel reads
  (`faithfulness`, `quality`, `size`, `warmth`, `centrality`: the image with more of it wins), with
  pairs closer than `--label-margin` left out. It asks whether DPO can learn a given trait from these
  pairs at all, separately from whether the raters' choices carry it;
- `--eval-stride K` judges every K-th ShapesEval prompt (a quicker, still task-balanced evaluation);
- `--renderings` adds a row for the world's own renderings of the judging prompts (one scene drawn
  per prompt, all faithful by construction: the pretraining data) judged against the base's samples
  the same way, with no training: the win rate of a model that had learned the world's data exactly;
- `--seeds 0,1,2` trains each offline run once per training seed (`runtime.seed`: the order of the
  pairs, the noise and the timesteps; the judging seeds stay fixed) and prints the mean win rate with
  the seeds' range: on these runs the seed alone moves the win rate by about 0.02 (docs/align.md).

    nice python benchmarks/dpo.py --out bench_dpo/                       # the full benchmark
    python benchmarks/dpo.py --pairs 64 --steps 20 --out /tmp/bench_dpo  # a smoke run
    python benchmarks/dpo.py --timing                                    # ms per DPO step only

Prints a markdown table and writes results.json into --out.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from diffalign.align.config_io import load_config
from diffalign.align.dpo import DPOConfig, train_dpo
from diffalign.align.runtime import RuntimeConfig
from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.evaluate.stats import bootstrap_mean_ci
from diffalign.models.registry import load_model
from diffalign.prefs.pairs import PreferencePairs
from diffalign.prefs.simulate import simulate_preferences
from diffalign.prefs.store import PreferenceStore
from diffalign.world.raters import TASTE_FEATURES, ImageFeatures, RaterPanel
from diffalign.world.render import render_batch
from diffalign.world.scene import sample_scenes, templates_from_metadata
from diffalign.world.shapeseval import load_shapeseval

KEY = re.compile(r"^simulated:(\d+):(\d+)$")
#: What `--labels` can relabel the pairs by, beside the stored choices ("panel") and "gold".
LABEL_FEATURES: tuple[str, ...] = ("faithfulness", "quality", *TASTE_FEATURES)


def first_pairs(pairs: PreferencePairs, n: int, seed: int = 0) -> PreferencePairs:
    """The pairs of simulated comparisons 0..n-1 of run seed `seed` (keys simulated:<seed>:<i>)."""
    keep = []
    for row, key in enumerate(pairs.keys):
        match = KEY.match(key)
        if match and int(match.group(1)) == seed and int(match.group(2)) < n:
            keep.append(row)
    return pairs.select(keep)


def feature_column(features: ImageFeatures, name: str) -> torch.Tensor:
    """[B] float64 values of one feature the panel reads (see LABEL_FEATURES)."""
    if name in TASTE_FEATURES:
        return features.taste[:, TASTE_FEATURES.index(name)].double()
    if name in ("faithfulness", "quality"):
        return getattr(features, name).double()
    raise ValueError(f"unknown label feature {name!r}; expected one of {LABEL_FEATURES}")


def relabel(pairs: PreferencePairs, panel: RaterPanel, labels: str, margin: float) -> PreferencePairs:
    """The pairs with deterministic labels: the image with the higher pooled gold utility ("gold") or
    with more of one feature wins; pairs whose values differ by `margin` or less are left out (for
    "gold", by less than the panel's tie margin when `margin` is 0). "panel" keeps the stored labels."""
    if labels == "panel":
        return pairs
    features_a = panel.features(pairs.images_a, pairs.prompts)
    features_b = panel.features(pairs.images_b, pairs.prompts)
    if labels == "gold":
        delta = panel.utility(features_a) - panel.utility(features_b)
        margin = margin or panel.config.tie_margin
    else:
        delta = feature_column(features_a, labels) - feature_column(features_b, labels)
    keep = torch.nonzero(delta.abs() > margin).flatten()
    if len(keep) == 0:
        raise ValueError(f"--labels {labels}: no pair differs by more than {margin}; lower --label-margin")
    relabelled = pairs.select(keep)
    relabelled.prob_a = (delta[keep] > 0).float()
    return relabelled


def feature_means(panel: RaterPanel, features: ImageFeatures) -> dict[str, float]:
    """Mean pooled utility, quality and taste features of a set of judged images."""
    means = {"utility": float(panel.utility(features).mean()), "quality": float(features.quality.mean())}
    for name in TASTE_FEATURES:
        means[name] = float(feature_column(features, name).mean())
    return means


def faithfulness_outcomes(tuned: ImageFeatures, base: ImageFeatures, scores) -> dict[str, dict[str, float]]:
    """The judged pairs split by whether the tuned image is more, less or equally faithful than the
    base image of the same seed: each part's share of the pairs and its win rate (None when empty).
    Pairs of equal faithfulness are decided by quality and taste alone."""
    difference = (tuned.faithfulness - base.faithfulness).numpy()
    parts = {"more": difference > 1e-6, "less": difference < -1e-6, "equal": abs(difference) <= 1e-6}
    return {
        name: {"share": float(mask.mean()), "win_rate": float(scores[mask].mean()) if mask.any() else None}
        for name, mask in parts.items()
    }


def generate(model, prompts: list[str], sampler: SamplerConfig, seed: int, batch: int) -> torch.Tensor:
    """uint8 images, image i sampled with seed `seed + i` (the same seeds for every model)."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        with torch.no_grad():
            traj = sample(model, chunk, config=sampler, seeds=[seed + start + i for i in range(len(chunk))])
        out.append((traj.images.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def judge(panel: RaterPanel, tuned: torch.Tensor, base: torch.Tensor, prompts: list[str]) -> dict:
    """Win rate of `tuned` over `base` by the pooled panel, with a 95% bootstrap interval over prompts."""
    features_tuned = panel.features(tuned, prompts)
    features_base = panel.features(base, prompts)
    p = panel.preference_prob(features_tuned, features_base).numpy()
    lo, hi = bootstrap_mean_ci(p, n_boot=2000)
    return {
        "win_rate": float(p.mean()),
        "ci95": [lo, hi],
        "win_rate_by_group": {
            group.name: float(panel.preference_prob(features_tuned, features_base, group=group.name).mean())
            for group in panel.config.groups
        },
        "faithfulness": faithfulness_outcomes(features_tuned, features_base, p),
        "accuracy_tuned": float(features_tuned.correct.double().mean()),
        "accuracy_base": float(features_base.correct.double().mean()),
        "means_tuned": feature_means(panel, features_tuned),
        "means_base": feature_means(panel, features_base),
        "prompts": len(prompts),
    }


def renderings(metadata: list[dict], size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [N, 3, size, size]: one world scene drawn for each prompt's metadata and rendered."""
    scenes = sample_scenes(
        templates_from_metadata(metadata),
        torch.arange(len(metadata)),
        generator=torch.Generator().manual_seed(seed),
    )
    return (render_batch(scenes, size).clamp(0, 1) * 255).round().to(torch.uint8)


def timing(args: argparse.Namespace) -> None:
    """ms per DPO step of the shipped models at several batch sizes (rendered pairs, no sampling)."""
    from diffalign.world.dataset import ShapesGenerator

    gen = ShapesGenerator()
    g = torch.Generator().manual_seed(0)
    first = gen.sample(64, g)
    second = gen.render(gen.scenes_for(first.prompt_ids, g))
    u8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731
    pairs = PreferencePairs(first.prompts, u8(first.images), u8(second), torch.ones(64))
    for spec in args.models:
        for batch in args.timing_batches:
            run = Path(args.out) / "timing" / f"{spec}-b{batch}"
            cfg = DPOConfig(
                model=spec,
                steps=args.timing_steps,
                batch_size=batch,
                log_every=args.timing_steps,
                checkpoint_every=0,
                log_with="none",
                runtime=RuntimeConfig(device=args.device),
            )
            lines = []
            train_dpo(cfg, pairs, run, on_log=lines.append)
            print(f"{spec} batch {batch} pairs: {1000 * lines[-1]['seconds_per_step']:.0f} ms per step")


def dpo_config(args: argparse.Namespace, spec: str, steps: int, seed: int | None = None) -> DPOConfig:
    """The benchmark's DPOConfig: its fixed fields, then --lr/--beta, then --set KEY=VALUE overrides,
    then the training seed when given."""
    fixed = [
        f"model={spec}",
        f"steps={steps}",
        f"batch_size={args.batch_size}",
        f"log_every={max(1, steps // 10)}",
        "checkpoint_every=0",
        "log_with=none",
        f"runtime.device={args.device}",
    ]
    fixed += [f"{k}={v}" for k, v in (("lr", args.lr), ("beta", args.beta)) if v is not None]
    seeded = [] if seed is None else [f"runtime.seed={seed}"]
    return load_config(DPOConfig, None, [*fixed, *args.set, *seeded])


def offline(args: argparse.Namespace, spec: str, base, out: Path, evaluate, panel: RaterPanel) -> None:
    """Offline DPO on the first N simulated pairs of the base model, for each N of --pairs."""
    started = time.perf_counter()
    store = PreferenceStore.open(args.store or out / spec / "prefs.db")
    report = simulate_preferences(base, store, max(args.pairs), batch_size=args.sample_batch, model_name=spec)
    all_pairs = store.pairs(size=base.latent_shape[-1], include_ties=True)
    simulate_s = time.perf_counter() - started
    print(f"{spec}: {report.sampled} pairs simulated in {simulate_s:.0f} s ({len(all_pairs)} stored)")
    for n in args.pairs:
        subset = relabel(first_pairs(all_pairs, n), panel, args.labels, args.label_margin)
        for seed in args.seeds or [None]:
            suffix = "" if args.labels == "panel" else f"-{args.labels}"
            suffix += "" if seed is None else f"-seed{seed}"
            run = out / spec / f"dpo-{n}{suffix}"
            started = time.perf_counter()
            lines: list[dict] = []
            tuned = train_dpo(
                dpo_config(args, spec, args.steps, seed),
                subset,
                run,
                resume=(run / "checkpoints").is_dir(),
                on_log=lines.append,
            )
            row = {
                "method": "offline" if args.labels == "panel" else f"offline, {args.labels} labels",
                "pairs": n,
                "pairs_used": int((subset.prob_a != 0.5).sum()),
                "steps": args.steps,
                "seed": seed,
                "final_implicit_acc": lines[-1]["implicit_acc"] if lines else None,
                "seconds": {"simulate": simulate_s, "train": time.perf_counter() - started},
            }
            evaluate(tuned, row)


def seed_summary(runs: list[dict]) -> list[dict]:
    """Runs of several training seeds (same model, method and pairs) pooled: their mean win rate, the
    lowest and highest, and the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r.get("seed") is not None:
            groups.setdefault((r["model"], r["method"], r["pairs"]), []).append(r)
    return [
        {
            "model": model,
            "method": method,
            "pairs": pairs,
            "seeds": [r["seed"] for r in rows],
            "mean_win_rate": sum(r["win_rate"] for r in rows) / len(rows),
            "min_win_rate": min(r["win_rate"] for r in rows),
            "max_win_rate": max(r["win_rate"] for r in rows),
        }
        for (model, method, pairs), rows in groups.items()
        if len(rows) > 1
    ]


def online(args: argparse.Namespace, spec: str, out: Path, shape: str, evaluate) -> None:
    """Online DPO, ROUNDSxPAIRS (e.g. 4x500): --steps optimiser steps in all, split over the rounds;
    every round's model is judged, so the table holds win rate against labelled pairs."""
    from diffalign.align.online_dpo import OnlineDPOConfig, train_online_dpo

    rounds, per_round = (int(x) for x in shape.lower().split("x"))
    config = OnlineDPOConfig(
        dpo=dpo_config(args, spec, max(1, args.steps // rounds)),
        rounds=rounds,
        pairs_per_round=per_round,
        reference_every=args.reference_every,
        sample_batch=args.sample_batch,
    )
    run = out / spec / f"online-{rounds}x{per_round}"
    started = time.perf_counter()

    def judge_round(line: dict) -> None:
        tuned = load_model(str(run / f"round-{line['round']:02d}"), device=args.device)
        row = {
            "method": f"online {rounds}x{per_round}",
            "round": line["round"],
            "pairs": line["labels_so_far"],
            "steps": (line["round"] + 1) * config.dpo.steps,
            "final_implicit_acc": line.get("final", {}).get("implicit_acc"),
            "seconds": {"train_so_far": time.perf_counter() - started},
        }
        evaluate(tuned, row)

    train_online_dpo(config, run, resume=(run / "config.json").is_file(), on_round=judge_round)


def evaluator(args, spec, sampler, prompts, panel, base_images, base_s, results, out):
    """A function judging a tuned model against the base's images and appending the row to results."""

    def evaluate(tuned, row: dict) -> dict:
        started = time.perf_counter()
        tuned_images = generate(tuned, prompts, sampler, seed=10_000, batch=args.sample_batch)
        verdict = judge(panel, tuned_images, base_images, prompts)
        row = {"model": spec, **row, **verdict}
        seconds = row.setdefault("seconds", {})
        seconds.update({"base_samples": base_s, "eval": time.perf_counter() - started})
        lo, hi = verdict["ci95"]
        print(
            f"{spec} {row['method']} {row['pairs']} labels: win rate {verdict['win_rate']:.3f} "
            f"[{lo:.3f}, {hi:.3f}], accuracy {verdict['accuracy_base']:.3f} -> "
            f"{verdict['accuracy_tuned']:.3f}; by group "
            + ", ".join(f"{name} {value:.3f}" for name, value in verdict["win_rate_by_group"].items()),
            flush=True,
        )
        results["runs"].append(row)
        results["seed_summary"] = seed_summary(results["runs"])
        (out / "results.json").write_text(json.dumps(results, indent=1))
        return row

    return evaluate


def spin(args: argparse.Namespace, spec: str, base, out: Path, shape: str, evaluate) -> None:
    """SPIN-Diffusion, ROUNDSxEXAMPLES (e.g. 3x2000) real scenes rendered by the world: --steps steps in
    all, split over the rounds; every round's model is judged. No labels are used."""
    from diffalign.align.spin import SPINConfig, real_from_world, train_spin

    rounds, examples = (int(x) for x in shape.lower().split("x"))
    config = SPINConfig(
        dpo=dpo_config(args, spec, max(1, args.steps // rounds)),
        rounds=rounds,
        sample_batch=args.sample_batch,
    )
    run = out / spec / f"spin-{rounds}x{examples}"
    real = real_from_world(examples, base.latent_shape[-1], seed=args.real_seed)
    started = time.perf_counter()

    def judge_round(line: dict) -> None:
        tuned = load_model(str(run / f"round-{line['round']:02d}"), device=args.device)
        row = {
            "method": f"spin {rounds}x{examples}",
            "round": line["round"],
            "pairs": 0,
            "real_examples": examples,
            "steps": (line["round"] + 1) * config.dpo.steps,
            "final_implicit_acc": line.get("final", {}).get("implicit_acc"),
            "seconds": {"train_so_far": time.perf_counter() - started},
        }
        evaluate(tuned, row)

    train_spin(config, real, run, resume=(run / "config.json").is_file(), on_round=judge_round)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench_dpo")
    parser.add_argument("--models", type=lambda s: s.split(","), default=["base", "base-flow"])
    parser.add_argument(
        "--pairs",
        type=lambda s: [int(x) for x in s.split(",") if x and x != "0"],
        default=[500, 2000, 8000],
        help="offline DPO sizes (0: no offline run)",
    )
    parser.add_argument(
        "--online",
        type=lambda s: [x for x in s.split(",") if x],
        default=[],
        help="online DPO runs, ROUNDSxPAIRS each (e.g. 4x500,8x250); --steps is split over the rounds",
    )
    parser.add_argument(
        "--spin",
        type=lambda s: [x for x in s.split(",") if x],
        default=[],
        help="SPIN runs on world-rendered scenes, ROUNDSxEXAMPLES each (e.g. 3x2000)",
    )
    parser.add_argument(
        "--store", default=None, help="train offline DPO on this store's pairs (extended if short)"
    )
    parser.add_argument(
        "--labels",
        default="panel",
        choices=["panel", "gold", *LABEL_FEATURES],
        help="offline DPO's labels: the stored choices, the gold utility's sign, or one feature's",
    )
    parser.add_argument(
        "--label-margin", type=float, default=0.02, help="pairs closer than this in --labels are left out"
    )
    parser.add_argument("--real-seed", type=int, default=0, help="seed of SPIN's rendered real scenes")
    parser.add_argument(
        "--renderings",
        action="store_true",
        help="also judge the world's renderings of the judging prompts against the base (no training)",
    )
    parser.add_argument("--reference-every", type=int, default=1, help="online DPO's reference refresh")
    parser.add_argument("--steps", type=int, default=1000, help="DPO steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: DPOConfig's")
    parser.add_argument("--beta", type=float, default=None, help="default: DPOConfig's per family")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="more DPOConfig fields, e.g. timestep_range=[0,0.3] sft_weight=0.5",
    )
    parser.add_argument("--eval-prompts", type=int, default=0, help="first N ShapesEval prompts (0: all)")
    parser.add_argument("--eval-stride", type=int, default=1, help="judge every K-th ShapesEval prompt")
    parser.add_argument(
        "--seeds",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[],
        help="offline runs once per training seed, e.g. 0,1,2 (default: the config's seed, once)",
    )
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timing", action="store_true", help="only measure ms per DPO step")
    parser.add_argument("--timing-batches", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16])
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: a busy CPU runs tiny models fastest)"
    )
    args = parser.parse_args(argv)
    if args.seeds and any(item.split("=")[0].strip() == "runtime.seed" for item in args.set):
        parser.error("--seeds with --set runtime.seed=...: give the training seeds one way")
    if args.store and len(args.models) > 1:
        parser.error(
            f"--store {args.store} with --models {','.join(args.models)}: a store holds one model's "
            "samples; run one model per store"
        )
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.timing:
        timing(args)
        return 0

    panel = RaterPanel()
    metadata = load_shapeseval()
    if args.eval_prompts:
        metadata = metadata[: args.eval_prompts]
    metadata = metadata[:: args.eval_stride]
    prompts = [m["prompt"] for m in metadata]
    results: dict = {"args": vars(args), "runs": [], "seed_summary": []}
    for spec in args.models:
        base = load_model(spec, device=args.device)
        sampler = SamplerConfig.for_prediction_type(base.prediction_type)
        started = time.perf_counter()
        base_images = generate(base, prompts, sampler, seed=10_000, batch=args.sample_batch)
        base_s = time.perf_counter() - started

        evaluate = evaluator(args, spec, sampler, prompts, panel, base_images, base_s, results, out)
        if args.renderings:
            rendered = renderings(metadata, base_images.shape[-1], seed=args.real_seed)
            row = {"model": spec, "method": "world renderings (no training)", "pairs": 0}
            results["runs"].append({**row, **judge(panel, rendered, base_images, prompts)})
            print(f"{spec} world renderings: win rate {results['runs'][-1]['win_rate']:.3f}", flush=True)

        if args.pairs:
            offline(args, spec, base, out, evaluate, panel)
        for shape in args.online:
            online(args, spec, out, shape, evaluate)
        for shape in args.spin:
            spin(args, spec, base, out, shape, evaluate)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| model | method | labelled pairs | win rate vs base | 95% CI | accuracy base -> tuned |")
    print("|---|---|---|---|---|---|")
    for r in results["runs"]:
        lo, hi = r["ci95"]
        print(
            f"| {r['model']} | {r['method']} | {r['pairs']} | {r['win_rate']:.3f} | [{lo:.3f}, {hi:.3f}] | "
            f"{r['accuracy_base']:.3f} -> {r['accuracy_tuned']:.3f} |"
        )
    if results["seed_summary"]:
        print("\n| model | method | labelled pairs | training seeds | mean win rate | lowest - highest |")
        print("|---|---|---|---|---|---|")
        for r in results["seed_summary"]:
            print(
                f"| {r['model']} | {r['method']} | {r['pairs']} | {','.join(map(str, r['seeds']))} | "
                f"{r['mean_win_rate']:.3f} | {r['min_win_rate']:.3f} - {r['max_win_rate']:.3f} |"
            )
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
