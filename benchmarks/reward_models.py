"""Benchmark of the learned reward models against the simulated rater panel of the Shapes world.

Pairs come from one of two image sources, labelled by the same `RaterPanel`:
- `--images base` (the brief's setting): two samples of the shipped base model per prompt, simulated
  into a preference store with `diffalign.prefs.simulate.simulate_preferences` (train pairs with seed
  0, held-out pairs with seed 1). Sampling dominates the cost (about 0.15 s per image on two free CPU
  cores, far more on a busy machine); `--store` reuses a store that already holds them.
- `--images world` (a fast stand-in): two renderings of the prompt's scene by the world's generator,
  each independently degraded (a wrong prompt's scene, pixel noise, blur) so that faithfulness, quality
  and taste all vary; seconds instead of minutes.

Reports: held-out pairwise accuracy of the pooled reward model (95% CI) beside the panel's agreement
ceiling (acceptance: within 5 points of the two-rater agreement), the data-scarcity curve, ECE, Spearman
with the panel's pooled (gold) utility, and the rater-conditioned vs the pooled model on held-out pairs
where the groups disagree (acceptance: conditioned beats pooled). Prints a markdown table, writes JSON.

    nice python benchmarks/reward_models.py --images base --out bench_rm/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffalign.align.config_io import load_config
from diffalign.prefs.pairs import PreferencePairs
from diffalign.rewards.bt_training import (
    RewardTrainConfig,
    describe_pretraining,
    initial_model,
    train_reward_model,
)
from diffalign.rewards.ensemble import train_ensemble
from diffalign.rewards.rm_metrics import (
    data_scarcity_curve,
    evaluate_reward,
    pairwise_accuracy,
    panel_ceiling,
    reward_margins,
)
from diffalign.world.dataset import ShapesGenerator
from diffalign.world.raters import RaterPanel


def world_pairs(n: int, panel: RaterPanel, seed: int) -> PreferencePairs:
    """n pairs of degraded world renderings for one prompt each, labelled by the panel."""
    gen = ShapesGenerator()
    g = torch.Generator().manual_seed(seed)
    ids = gen.sample_prompt_ids(n, g)
    prompts = [gen.metadata[i]["prompt"] for i in ids.tolist()]

    def variant() -> torch.Tensor:
        wrong = torch.rand(n, generator=g) < 0.35
        shown = torch.where(wrong, gen.sample_prompt_ids(n, g), ids)
        x = gen.render(gen.scenes_for(shown, g))
        blur = (torch.rand(n, generator=g) < 0.3)[:, None, None, None]
        x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1), x)
        sigma = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.5) * 0.25
        x = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)

    a, b = variant(), variant()
    labels = panel.label(a, b, prompts, generator=g)
    return PreferencePairs(prompts, a, b, labels.prob_a, raters=labels.raters, groups=labels.groups)


def base_pairs(store_path: Path, n_train: int, n_test: int, panel: RaterPanel):
    """Simulate (or reuse) base-model pairs in a store; train = seed 0, held-out = seed 1."""
    from diffalign.models.registry import load_model
    from diffalign.prefs.simulate import simulate_preferences
    from diffalign.prefs.store import PreferenceStore

    store = PreferenceStore.open(store_path)
    model = load_model("base")

    def progress(done: int, total: int) -> None:
        print(f"  simulated {done}/{total}", flush=True)

    from diffalign.diffusion.sampling import SamplerConfig

    # The demo's sampler: DDIM, 10 steps, guidance 3.
    sampler = SamplerConfig.for_prediction_type(model.prediction_type, num_steps=10, guidance_scale=3.0)
    for n, seed in ((n_train, 0), (n_test, 1)):
        simulate_preferences(
            model, store, n, panel=panel, seed=seed, sampler_config=sampler, batch_size=128, progress=progress
        )
    pairs = store.pairs(size=32)
    is_train = [k.startswith("simulated:0:") and int(k.rsplit(":", 1)[1]) < n_train for k in pairs.keys]
    is_test = [k.startswith("simulated:1:") and int(k.rsplit(":", 1)[1]) < n_test for k in pairs.keys]
    return (
        pairs.select([i for i, t in enumerate(is_train) if t]),
        pairs.select([i for i, t in enumerate(is_test) if t]),
    )


def disagreement_subset(panel: RaterPanel, pairs: PreferencePairs) -> PreferencePairs:
    """Held-out pairs on which the panel's groups prefer different images."""
    probs = [
        panel.preference_prob(pairs.images_a, pairs.images_b, pairs.prompts, group=g) for g in panel.groups
    ]
    lo = torch.stack(probs).min(0).values
    hi = torch.stack(probs).max(0).values
    return pairs.select(((lo < 0.5) & (hi > 0.5)).nonzero().flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", choices=["base", "world"], default="base")
    parser.add_argument("--train-pairs", type=int, default=2000)
    parser.add_argument("--test-pairs", type=int, default=500)
    parser.add_argument("--ensemble", type=int, default=5, help="Members of the ensemble (0: none).")
    parser.add_argument("--sizes", type=int, nargs="+", default=[125, 250, 500, 1000, 2000])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--store", type=Path, default=None, help="Store for --images base (default OUT/prefs.db)."
    )
    parser.add_argument("--out", type=Path, default=Path("bench_reward_models"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=0, help="World-caption pretraining steps.")
    parser.add_argument(
        "--shared-pretraining",
        action="store_true",
        help="Pretrain once and fine-tune every ensemble member from that model.",
    )
    parser.add_argument(
        "--no-bootstrap",
        action="store_true",
        help="Fit every ensemble member on all the training pairs instead of a bootstrap resample.",
    )
    parser.add_argument(
        "--skip-conditioned",
        action="store_true",
        help="Leave out the rater-conditioned model and its disagreement-pair comparison.",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="A RewardTrainConfig field as key=value, e.g. model.channels=[32,64,128] lr=5e-4.",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    panel = RaterPanel()

    if args.images == "base":
        train, test = base_pairs(
            args.store or args.out / "prefs.db", args.train_pairs, args.test_pairs, panel
        )
    else:
        train = world_pairs(args.train_pairs, panel, seed=args.seed)
        test = world_pairs(args.test_pairs, panel, seed=args.seed + 1)
    print(f"{len(train)} train / {len(test)} held-out pairs ({time.time() - started:.0f} s)", flush=True)
    config = load_config(
        RewardTrainConfig,
        None,
        [
            f"epochs={args.epochs}",
            f"seed={args.seed}",
            f"pretrain_steps={args.pretrain_steps}",
            *args.overrides,
        ],
    )

    def log(tag: str):
        def show(r: dict) -> None:
            if "pretrain_step" in r:
                print(f"  [{tag}] {describe_pretraining(r)} ({r['elapsed_s']:.0f} s)", flush=True)
                return
            print(
                f"  [{tag}] epoch {r['epoch']} train {r['train_loss']:.4f} val {r['held_out_loss']:.4f} "
                f"acc {r['held_out_accuracy']:.3f} ({r['elapsed_s']:.0f} s)",
                flush=True,
            )

        return show

    # With --shared-pretraining the pooled model and every ensemble member start from one pretraining.
    pretrained = None
    if args.shared_pretraining and config.pretrain_steps > 0:
        fit, _ = train.split(config.held_out_fraction, seed=config.seed)
        pretrained = initial_model(fit, config, on_log=log("pretraining"))
    pooled = train_reward_model(train, config, on_log=log("pooled"), initial=pretrained)
    ceiling = panel_ceiling(panel, test)

    def gold(images, prompts):
        return panel.utility(images, prompts)

    report = evaluate_reward(pooled.model, test, gold=gold, ceiling=ceiling)
    print(
        f"pooled: accuracy {report['accuracy']:.3f} vs oracle {ceiling['oracle']:.3f}, "
        f"ECE {report['ece']:.3f}, Spearman with gold {report['spearman_gold']:.3f}",
        flush=True,
    )
    (args.out / "pooled.json").write_text(json.dumps(report, indent=1), encoding="utf-8")

    ensemble_report = None
    if args.ensemble > 1:
        ensemble, members = train_ensemble(
            train,
            args.ensemble,
            config,
            shared_pretraining=args.shared_pretraining,
            initial=pretrained,
            bootstrap=not args.no_bootstrap,
        )
        ensemble_report = evaluate_reward(ensemble, test, gold=gold, ceiling=ceiling)
        ensemble_report["members"] = [pairwise_accuracy(*_margin(m.model, test))["accuracy"] for m in members]
        print(
            f"ensemble of {args.ensemble}: accuracy {ensemble_report['accuracy']:.3f} "
            f"(members {', '.join(f'{a:.3f}' for a in ensemble_report['members'])})",
            flush=True,
        )

    disagree = disagreement_subset(panel, test)
    split, cond_all, oracle_dis = {}, None, None
    if not args.skip_conditioned:
        conditioned = train_reward_model(train, config, rater_conditioned=True, on_log=log("conditioned"))
        for name, model in (("pooled", pooled.model), ("conditioned", conditioned.model)):
            ra, rb = reward_margins(model, disagree)
            split[name] = pairwise_accuracy(ra - rb, disagree.prob_a)
        cond_all = evaluate_reward(conditioned.model, test)
        oracle_dis = panel_ceiling(panel, disagree)
        print(f"disagreement pairs: {split}", flush=True)

    curve = [{"size": len(train), **pairwise_accuracy(*_margin(pooled.model, test)), "epochs": args.epochs}]
    sizes = [s for s in args.sizes if s < len(train)]
    if sizes:
        # the same number of optimiser steps as a 1,000-pair run, within [epochs, 5 * epochs] passes
        def epochs_for(size: int) -> int:
            return max(args.epochs, min(5 * args.epochs, args.epochs * 1000 // size))

        curve = (
            data_scarcity_curve(
                train,
                sizes,
                test=test,
                config=config,
                epochs_for_size=epochs_for,
                on_log=lambda r: print("  curve", r),
            )
            + curve
        )

    results = {
        "images": args.images,
        "train_pairs": len(train),
        "test_pairs": len(test),
        "ties_train": int(train.is_tie.sum()),
        "pooled": report,
        "ensemble_members": args.ensemble,
        "ensemble": ensemble_report,
        "scarcity_curve": curve,
        "conditioned_all": cond_all,
        "disagreement_pairs": len(disagree),
        "disagreement": split,
        "disagreement_ceiling": oracle_dis,
        "seconds": time.time() - started,
        "command": f"python benchmarks/reward_models.py --images {args.images} "
        f"--train-pairs {args.train_pairs} --test-pairs {args.test_pairs} --epochs {args.epochs} "
        f"--pretrain-steps {args.pretrain_steps} --ensemble {args.ensemble}"
        + (" --shared-pretraining" if args.shared_pretraining else "")
        + (" --no-bootstrap" if args.no_bootstrap else "")
        + (" --skip-conditioned" if args.skip_conditioned else "")
        + "".join(f" --set {o}" for o in args.overrides),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(markdown(results))


def _margin(model, pairs):
    ra, rb = reward_margins(model, pairs)
    return ra - rb, pairs.prob_a


def markdown(r: dict) -> str:
    p, c = r["pooled"], r["pooled"]["ceiling"]
    lines = [
        f"images: {r['images']}; {r['train_pairs']} train pairs, {r['test_pairs']} held-out pairs",
        "",
        "| metric | value |",
        "|---|---|",
        f"| pooled held-out accuracy (95% CI) | {p['accuracy']:.3f} "
        f"[{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] |",
        f"| panel oracle ceiling | {c['oracle']:.3f} |",
        f"| two-rater agreement | {c['two_rater']:.3f} |",
        f"| oracle told the group | {c['oracle_by_group']:.3f} |",
        f"| gap to oracle (points) | {100 * (c['oracle'] - p['accuracy']):.1f} |",
        f"| gap to two-rater agreement (points) | {100 * (c['two_rater'] - p['accuracy']):.1f} |",
        f"| ECE (10 bins) | {p['ece']:.3f} |",
        f"| Spearman with gold utility | {p['spearman_gold']:.3f} |",
        *(
            [
                f"| ensemble of {r['ensemble_members']} held-out accuracy (95% CI) | "
                f"{r['ensemble']['accuracy']:.3f} "
                f"[{r['ensemble']['ci95'][0]:.3f}, {r['ensemble']['ci95'][1]:.3f}] |",
                f"| ensemble's gap to two-rater agreement (points) | "
                f"{100 * (c['two_rater'] - r['ensemble']['accuracy']):.1f} |",
            ]
            if r.get("ensemble")
            else []
        ),
        *(
            [
                f"| conditioned held-out accuracy (own group) | {r['conditioned_all']['accuracy']:.3f} |",
                f"| disagreement pairs: pooled | {r['disagreement']['pooled']['accuracy']:.3f} |",
                f"| disagreement pairs: conditioned | {r['disagreement']['conditioned']['accuracy']:.3f} |",
                "| disagreement pairs: oracle told the group | "
                f"{r['disagreement_ceiling']['oracle_by_group']:.3f} |",
            ]
            if r.get("conditioned_all")
            else []
        ),
        "",
        "| train pairs | held-out accuracy (95% CI) |",
        "|---|---|",
    ]
    for row in r["scarcity_curve"]:
        lines.append(
            f"| {row['size']} | {row['accuracy']:.3f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] |"
        )
    lines.append(f"\n{r['seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
