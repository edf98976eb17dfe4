"""Simulated preference data: sample two images per prompt from a model, let the rater panel choose.

`simulate_preferences` fills a `PreferenceStore` with comparisons labelled by the Shapes world's
simulated raters (`diffalign.world.raters`, Bradley-Terry choices on faithfulness, quality and group
taste). Everything is a function of `seed`: pair i gets the prompt, the two sampling seeds, the rater
and the rater's random number it would get in any other run with the same seed, whatever the batch
size, and its key is ``simulated:<seed>:<i>``, so running it again adds nothing (pairs already in the
store are not even sampled again) and asking for more pairs extends the same sequence.

`measure_agreement` samples pairs the same way without a store and reports the panel's agreement on
them; ``python -m diffalign.prefs.simulate --pairs 240`` prints it (docs/raters.md quotes the figures).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from PIL import Image
from torch import Tensor

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.panels import panel_fingerprint
from diffalign.prefs.records import CHOICE_IMAGE, CHOICE_TIE, ImportReport, NewComparison
from diffalign.world.grammar import all_metadata, parse_prompt
from diffalign.world.palette import CATEGORIES
from diffalign.world.raters import AgreementReport, ImageFeatures, RaterPanel

SOURCE = "simulated"
#: Sampling seeds of pair i under run seed s: s * SEED_STRIDE + 2 i (image A) and + 2 i + 1 (image B).
SEED_STRIDE = 1_000_000_000


@dataclass
class SimulationReport:
    """What a simulation run did.

    Attributes:
        requested: pairs asked for (n_pairs, or this process's `share` of them).
        sampled: pairs sampled and labelled in this run (pairs already in the store are skipped).
        added: comparisons the store added.
        duplicates: comparisons the store already held (written by an earlier run).
        ties: labels that are ties among the sampled pairs.
        correct_rate: share of the sampled images that the GenEval verdict calls correct.
        agreement: the panel's agreement on the sampled pairs (None when nothing was sampled).
        seconds: wall time of the run.
        model: the model's name as recorded in the comparisons' meta.
        keys: the keys of the sampled pairs.
    """

    requested: int
    sampled: int = 0
    added: int = 0
    duplicates: int = 0
    ties: int = 0
    correct_rate: float = float("nan")
    agreement: AgreementReport | None = None
    seconds: float = 0.0
    model: str = ""
    keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["agreement"] = self.agreement.to_dict() if self.agreement is not None else None
        out.pop("keys")
        return out


@dataclass
class SampledPairs:
    """Pairs of images sampled for the same prompts, with the panel's features of each image.

    Attributes:
        indices: the pair indices i (the position in the run's sequence).
        prompts: prompt per pair.
        images_a, images_b: uint8 [N, 3, H, W] (what is stored and what the raters saw).
        seeds: (seed of A, seed of B) per pair.
        features_a, features_b: the panel's reading of the images.
    """

    indices: list[int]
    prompts: list[str]
    images_a: Tensor
    images_b: Tensor
    seeds: list[tuple[int, int]]
    features_a: ImageFeatures
    features_b: ImageFeatures


def pair_prompts(n_pairs: int, prompts: Sequence[str] | None = None, seed: int = 0) -> list[str]:
    """The first n_pairs prompts of the run's sequence: without `prompts`, a task drawn uniformly from
    GenEval's six, then a prompt of the world uniformly within it; with `prompts`, uniformly among them.
    Pair i's prompt does not depend on n_pairs. Every prompt is checked against the world's grammar (a
    GrammarError names the bad one)."""
    if n_pairs < 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs}")
    u = torch.rand((n_pairs, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if prompts is None:
        by_tag = [[m["prompt"] for m in all_metadata(tag)] for tag in CATEGORIES]
        tags = (u[:, 0] * len(CATEGORIES)).long().clamp(max=len(CATEGORIES) - 1).tolist()
        return [
            by_tag[t][min(int(v * len(by_tag[t])), len(by_tag[t]) - 1)]
            for t, v in zip(tags, u[:, 1].tolist())
        ]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty (None means every prompt of the world)")
    for p in dict.fromkeys(prompts):
        parse_prompt(p)
    return [prompts[min(int(v * len(prompts)), len(prompts) - 1)] for v in u[:, 0].tolist()]


def _model_name(model: DiffusionModel, name: str | None) -> str:
    return name or str(getattr(model, "name", None) or type(model).__name__)


def sample_pairs(
    model: DiffusionModel,
    prompts: Sequence[str],
    indices: Sequence[int],
    panel: RaterPanel,
    *,
    sampler_config: SamplerConfig,
    seed: int = 0,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> SampledPairs:
    """Sample images A and B for pair indices `indices` (prompts[k] for indices[k]) and read them.

    Images are sampled `batch_size` at a time (A and B of a pair in the same call), quantised to uint8
    (the raters see what the store keeps), and read by `panel.features`.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (two images per pair), got {batch_size}")
    if len(prompts) != len(indices):
        raise ValueError(f"sample_pairs: {len(prompts)} prompts but {len(indices)} indices")
    per_call = batch_size // 2
    a_parts, b_parts, seeds, fa_parts, fb_parts = [], [], [], [], []
    for start in range(0, len(indices), per_call):
        idx = list(indices[start : start + per_call])
        ps = list(prompts[start : start + per_call])
        sa = [seed * SEED_STRIDE + 2 * i for i in idx]
        sb = [s + 1 for s in sa]
        with torch.no_grad():
            traj = sample(model, ps + ps, config=sampler_config, seeds=sa + sb)
        images = (traj.images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        a, b = images[: len(idx)], images[len(idx) :]
        a_parts.append(a)
        b_parts.append(b)
        fa_parts.append(panel.features(a, ps))
        fb_parts.append(panel.features(b, ps))
        seeds += list(zip(sa, sb))
        if progress is not None:
            progress(min(start + per_call, len(indices)), len(indices))
    if not indices:
        empty = torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
        return SampledPairs([], [], empty, empty, [], panel.features(empty, []), panel.features(empty, []))
    return SampledPairs(
        list(indices),
        list(prompts),
        torch.cat(a_parts),
        torch.cat(b_parts),
        seeds,
        ImageFeatures.concat(fa_parts),
        ImageFeatures.concat(fb_parts),
    )


def encode_png(image: Tensor) -> bytes:
    """uint8 [3, H, W] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


#: What pair i of a run depends on besides its seed, recorded in every comparison's meta: a store that
#: holds pairs of the same seed made otherwise must not have them taken for this run's.
RUN_FIELDS: tuple[str, ...] = ("model", "sampler", "panel", "prompts")


def _existing_keys(store: object, prefix: str, run: dict) -> set[str]:
    """The keys of the run's pairs already in `store`; raises ValueError when they were made by another
    model, sampler, panel or prompt list than `run` (the same seed would otherwise silently reuse them)."""
    keys = set()
    for comparison in store.comparisons(source=SOURCE):  # type: ignore[attr-defined]
        if not comparison.key.startswith(prefix):
            continue
        if not keys:
            meta = comparison.meta or {}
            differ = [name for name in RUN_FIELDS if name in meta and not _same(meta[name], run[name])]
            if differ:
                stored = "; ".join(f"{name} {meta[name]!r}" for name in differ)
                asked = "; ".join(f"{name} {run[name]!r}" for name in differ)
                raise ValueError(
                    f"the store already holds simulated pairs of seed {prefix.split(':')[1]} made with "
                    f"{stored}; this run asks for {asked}. Use another --seed or another store"
                )
        keys.add(comparison.key)
    return keys


def _same(stored: object, asked: object) -> bool:
    """Whether a stored run field matches this run's. Mappings are compared on the keys both have, so
    pairs written by an older version (a panel recorded without its fingerprint, a sampler without a
    field added since) still extend."""
    if isinstance(stored, dict) and isinstance(asked, dict):
        return all(_same(stored[k], asked[k]) for k in stored.keys() & asked.keys())
    return json.dumps(stored, sort_keys=True) == json.dumps(asked, sort_keys=True)


def _prompts_fingerprint(prompts: Sequence[str]) -> str:
    """A short hash of the prompt list pairs are drawn from (order matters: it fixes pair i's prompt)."""
    return hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest()[:16]


def check_share(share: tuple[int, int]) -> None:
    """Refuse a (index, count) process share that names no process."""
    index, count = share
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"share must be (index, count) with 0 <= index < count, got {share}")


def simulate_preferences(
    model: DiffusionModel,
    store: object,
    n_pairs: int,
    *,
    panel: RaterPanel | None = None,
    prompts: Sequence[str] | None = None,
    sampler_config: SamplerConfig | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    model_name: str | None = None,
    share: tuple[int, int] = (0, 1),
) -> SimulationReport:
    """Write n_pairs simulated comparisons into `store` (a `PreferenceStore`); see the module doc.

    Each pair shows two images sampled for one prompt with different seeds; one rater of the panel,
    drawn at random, chooses by Bradley-Terry (or calls a tie). The comparison is written with
    ``choice='image'`` and ``chosen`` 0 or 1, or ``choice='tie'``, the rater's name and group,
    ``source='simulated'``, key ``simulated:<seed>:<i>`` and meta holding the utilities, the rater's
    Bradley-Terry probability, faithfulness and quality of both images, the sampler and the model.

    Args:
        model: any `DiffusionModel` (e.g. `diffalign.models.registry.load_model('base')`).
        store: a `PreferenceStore` (needs `add` and `comparisons`).
        n_pairs: comparisons in the run's sequence; pairs whose key is already stored are skipped.
        panel: the raters (default `RaterPanel()`).
        prompts: Shapes-world prompts to draw from (default: every prompt, uniform over the six tasks).
        sampler_config: how to sample (default: the model family's default sampler).
        seed: fixes prompts, sampling seeds, raters and choices.
        batch_size: images per sampling call (two per pair).
        progress: called with (pairs done, pairs to do) after every sampling call.
        model_name: the model's name for the meta (default: its `name` attribute or class name).
        share: (index, count): sample and label only the pairs i with i % count == index, this
            process's share of a run over `count` processes (each writes its own pairs; a pair's
            prompt, seeds, rater and choice are those a single process gives it).
    """
    check_share(share)
    started = time.perf_counter()
    panel = panel or RaterPanel()
    config = sampler_config or SamplerConfig.for_prediction_type(model.prediction_type)
    name = _model_name(model, model_name)
    mine = range(share[0], n_pairs, share[1])
    report = SimulationReport(requested=len(mine), model=name)
    all_prompts = pair_prompts(n_pairs, prompts, seed)
    rater_index, uniforms = panel.draw(n_pairs, torch.Generator().manual_seed(seed + 1))
    prefix = f"{SOURCE}:{seed}:"
    sampler_meta = json.loads(json.dumps(asdict(config)))  # as stored: tuples become lists
    panel_meta = {
        "temperature": panel.config.temperature,
        "tie_margin": panel.config.tie_margin,
        "fingerprint": panel_fingerprint(panel),
    }
    prompts_meta = None if prompts is None else _prompts_fingerprint(prompts)
    run = {"model": name, "sampler": sampler_meta, "panel": panel_meta, "prompts": prompts_meta}
    existing = _existing_keys(store, prefix, run)
    todo = [i for i in mine if f"{prefix}{i}" not in existing]
    report.duplicates = len(mine) - len(todo)
    if not todo:
        report.seconds = time.perf_counter() - started
        return report
    per_call = max(1, batch_size // 2)
    features_a, features_b = [], []
    correct = 0
    for start in range(0, len(todo), per_call):
        idx = todo[start : start + per_call]
        pairs = sample_pairs(
            model,
            [all_prompts[i] for i in idx],
            idx,
            panel,
            sampler_config=config,
            seed=seed,
            batch_size=2 * len(idx),
        )
        labels = panel.choose(pairs.features_a, pairs.features_b, rater_index[idx], uniforms[idx])
        pooled_a = panel.utility(pairs.features_a)
        pooled_b = panel.utility(pairs.features_b)
        items = []
        for k, i in enumerate(idx):
            fa, fb = pairs.features_a, pairs.features_b
            tie = bool(labels.prob_a[k] == 0.5)
            meta = {
                "tag": panel.metadata(pairs.prompts[k])["tag"],
                "model": name,
                "sampler": sampler_meta,
                "seeds": list(pairs.seeds[k]),
                "index": i,
                "run_seed": seed,
                "utility": [float(pooled_a[k]), float(pooled_b[k])],
                "rater_utility": [float(labels.utility_a[k]), float(labels.utility_b[k])],
                "p_model": float(labels.p_model[k]),
                "faithfulness": [float(fa.faithfulness[k]), float(fb.faithfulness[k])],
                "correct": [bool(fa.correct[k]), bool(fb.correct[k])],
                "quality": [float(fa.quality[k]), float(fb.quality[k])],
                "panel": panel_meta,
                "prompts": prompts_meta,
            }
            items.append(
                NewComparison(
                    prompt=pairs.prompts[k],
                    images=[encode_png(pairs.images_a[k]), encode_png(pairs.images_b[k])],
                    choice=CHOICE_TIE if tie else CHOICE_IMAGE,
                    chosen=None if tie else (0 if labels.prob_a[k] == 1.0 else 1),
                    rater=labels.raters[k],
                    rater_group=labels.groups[k],
                    source=SOURCE,
                    key=f"{prefix}{i}",
                    meta=meta,
                    image_meta=[{"model": name, "seed": s} for s in pairs.seeds[k]],
                    where=f"simulated pair {i}",
                )
            )
            report.ties += tie
            report.keys.append(f"{prefix}{i}")
        result: ImportReport = store.add(items)  # type: ignore[attr-defined]
        report.added += result.added
        report.duplicates += result.duplicates
        report.sampled += len(idx)
        correct += int(pairs.features_a.correct.sum() + pairs.features_b.correct.sum())
        features_a.append(pairs.features_a)
        features_b.append(pairs.features_b)
        if progress is not None:
            progress(report.sampled, len(todo))
    report.correct_rate = correct / (2 * report.sampled)
    report.agreement = panel.agreement(ImageFeatures.concat(features_a), ImageFeatures.concat(features_b))
    report.seconds = time.perf_counter() - started
    return report


def measure_agreement(
    model: DiffusionModel,
    n_pairs: int,
    *,
    panel: RaterPanel | None = None,
    prompts: Sequence[str] | None = None,
    sampler_config: SamplerConfig | None = None,
    seed: int = 0,
    batch_size: int = 64,
    target: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Sample n_pairs pairs as `simulate_preferences` would (no store) and report the panel's agreement
    on them; with `target`, also the temperature at which two-rater agreement would equal it."""
    panel = panel or RaterPanel()
    config = sampler_config or SamplerConfig.for_prediction_type(model.prediction_type)
    started = time.perf_counter()
    ps = pair_prompts(n_pairs, prompts, seed)
    pairs = sample_pairs(
        model,
        ps,
        list(range(n_pairs)),
        panel,
        sampler_config=config,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    out: dict = {
        "pairs": n_pairs,
        "seed": seed,
        "sampler": asdict(config),
        "temperature": panel.config.temperature,
        "tie_margin": panel.config.tie_margin,
        "correct_rate": float(
            torch.cat([pairs.features_a.correct, pairs.features_b.correct]).double().mean()
        ),
        "mean_quality": float(torch.cat([pairs.features_a.quality, pairs.features_b.quality]).mean()),
        "agreement": panel.agreement(pairs.features_a, pairs.features_b).to_dict(),
    }
    if target is not None:
        calibrated = RaterPanel(replace(panel.config))
        out["calibrated_temperature"] = calibrated.calibrate_temperature(
            pairs.features_a, pairs.features_b, target=target
        )
        out["calibrated_agreement"] = calibrated.agreement(pairs.features_a, pairs.features_b).to_dict()
    out["seconds"] = time.perf_counter() - started
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffalign.prefs.simulate``: measure the default panel's agreement on model pairs."""
    parser = argparse.ArgumentParser(description=measure_agreement.__doc__)
    parser.add_argument("--model", default="base", help="model to sample ('base', 'base-flow' or a folder)")
    parser.add_argument("--pairs", type=int, default=240, help="pairs to sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the sampler's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--target", type=float, default=None, help="also calibrate a temperature to this")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffalign.models.registry import load_model

    model = load_model(args.model)
    overrides = {} if args.steps is None else {"num_steps": args.steps}
    config = SamplerConfig.for_prediction_type(model.prediction_type, **overrides)
    result = measure_agreement(
        model,
        args.pairs,
        sampler_config=config,
        seed=args.seed,
        batch_size=args.batch_size,
        target=args.target,
    )
    result["model"] = args.model
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = [
    "SEED_STRIDE",
    "SOURCE",
    "SampledPairs",
    "SimulationReport",
    "encode_png",
    "measure_agreement",
    "pair_prompts",
    "sample_pairs",
    "simulate_preferences",
]
