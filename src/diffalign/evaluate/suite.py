"""Every evaluation metric for one model in one call: what `diffalign eval` reports next to ShapesEval.

`evaluate_suite` samples the prompts once (one image per entry, seed i for entry i) and computes, on
those samples:
- "rewards": the mean of each given reward with a percentile bootstrap interval over prompts;
- "win_rate": against a baseline model sampled on the same prompts and seeds, judged by the gold rater
  panel or by a reward (`winrate.py`);
- "diversity": mean pairwise distance over the whole set and per-prompt variety, in pixel space and in
  the Shapes feature space (`diversity.py`);
- "fid": FID and KID against rendered world images of the same prompts (`fid.py`), or against
  `reference_images`;
- "kl": KL to a base model from the samples' own trajectories (`kl.py`; needs a stochastic sampler).
Each block is computed only when its inputs are given; a block that cannot be computed from what was
given raises a ValueError naming the argument (nothing is skipped silently).
ShapesEval itself stays in `shapeseval_run.evaluate_on_shapeseval` (it writes GenEval's layout).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from diffalign.diffusion.protocol import DiffusionModel
from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.evaluate.diversity import mean_pairwise_distance, per_prompt_variety, pixel_features
from diffalign.evaluate.features import ShapesFeatureNet, extract_features, load_feature_net
from diffalign.evaluate.fid import fid_kid
from diffalign.evaluate.kl import kl_from_log_probs, trajectory_log_ratios
from diffalign.evaluate.stats import bootstrap_mean_ci
from diffalign.evaluate.winrate import panel_win_rate, reward_win_rate
from diffalign.rewards.protocol import Reward
from diffalign.world.raters import RaterPanel


def per_prompt_means(values: Tensor | np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """The mean of `values` within each distinct prompt (first-appearance order)."""
    x = np.asarray(torch.as_tensor(values).detach().cpu().double().numpy()).reshape(-1)
    if x.size != len(prompts):
        raise ValueError(f"per_prompt_means: {x.size} values for {len(prompts)} prompts")
    groups: dict[str, list[float]] = {}
    for prompt, value in zip(prompts, x.tolist()):
        groups.setdefault(prompt, []).append(value)
    return np.array([np.mean(v) for v in groups.values()])


def reward_summary(values: Tensor, prompts: Sequence[str], n_boot: int = 2000, seed: int = 0) -> dict:
    """{"mean", "ci95", "n"}: the mean reward and its bootstrap interval over prompts."""
    lo, hi = bootstrap_mean_ci(per_prompt_means(values, prompts), n_boot=n_boot, seed=seed)
    return {"mean": float(values.double().mean()), "ci95": [lo, hi], "n": int(values.numel())}


def world_reference_images(prompts: Sequence[str], canvas_size: int, seed: int = 0) -> Tensor:
    """Rendered world scenes for `prompts` (one per entry), the data distribution FID compares to."""
    from diffalign.world.dataset import DatasetConfig, ShapesGenerator

    world = ShapesGenerator(DatasetConfig(canvas_size=canvas_size))
    index = {m["prompt"]: i for i, m in enumerate(world.metadata)}
    unknown = [p for p in prompts if p not in index]
    if unknown:
        raise ValueError(
            f"reference_images: {len(unknown)} prompt(s) are not Shapes-world prompts (e.g. {unknown[0]!r}); "
            "pass reference_images for FID"
        )
    ids = torch.tensor([index[p] for p in prompts])
    return world.render(world.scenes_for(ids, torch.Generator().manual_seed(seed)))


@torch.no_grad()
def sample_images(
    model: DiffusionModel,
    prompts: Sequence[str],
    config: SamplerConfig,
    seeds: Sequence[int],
    batch_size: int,
    base: DiffusionModel | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Images [n, 3, H, W] (one per prompt, seeds[i] for prompt i) and, with `base`, the [n, S]
    per-dimension log-ratios log p_model - log p_base of the same trajectories."""
    images, ratios = [], []
    for i in range(0, len(prompts), batch_size):
        traj = sample(
            model, list(prompts[i : i + batch_size]), config=config, seeds=list(seeds[i : i + batch_size])
        )
        images.append(traj.images.detach().cpu())
        if base is not None:
            ratios.append(trajectory_log_ratios(model, base, traj))
    return torch.cat(images), (torch.cat(ratios) if base is not None else None)


@torch.no_grad()
def evaluate_suite(
    model: DiffusionModel,
    prompts: Sequence[str],
    config: SamplerConfig,
    seeds: Sequence[int] | None = None,
    *,
    rewards: Mapping[str, Reward] | None = None,
    baseline: DiffusionModel | None = None,
    judge: RaterPanel | Reward | None = None,
    judge_group: str | None = None,
    diversity: bool = True,
    fid: bool = True,
    reference_images: Tensor | None = None,
    feature_net: ShapesFeatureNet | None = None,
    base: DiffusionModel | None = None,
    batch_size: int = 64,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """All metrics of `model` on `prompts` (see the module doc).

    Args:
        model: the model to evaluate.
        prompts: one sample per entry (repeat a prompt for per-prompt variety).
        config: the sampler (stochastic if `base` is given).
        seeds: per-sample seeds (default 0..n-1); the baseline uses the same ones.
        rewards: {name: reward} whose means to report.
        baseline: a model to compute the win rate against (None: no "win_rate").
        judge: the win-rate judge: a `RaterPanel` (default, the gold panel) or a reward.
        judge_group: with a panel judge, one rater group's verdict instead of the pooled panel's.
        diversity: report diversity.
        fid: report FID/KID (against `reference_images`, default rendered world scenes of the prompts).
        reference_images: the data images for FID/KID ([m, 3, H, W] in [0, 1]).
        feature_net: the feature extractor for FID/KID and feature diversity (default: shipped).
        base: the base model for "kl" (None: no KL).
        batch_size: samples per batch.
        n_boot: bootstrap resamples for the intervals.
        seed: seeds the bootstraps, KID subsets and the reference scenes' layouts.
    """
    prompts = list(prompts)
    if len(prompts) < 2:
        raise ValueError(f"evaluate_suite needs at least two prompts, got {len(prompts)}")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"evaluate_suite: {len(seeds)} seeds for {len(prompts)} prompts")
    if base is not None and not config.stochastic:
        raise ValueError(f"base: KL to the base model needs a stochastic sampler, got {config.sampler!r}")
    images, ratios = sample_images(model, prompts, config, seeds, batch_size, base)
    out: dict = {"n": len(prompts), "prompts": len(set(prompts)), "sampler": dict(config.__dict__)}
    if rewards:
        out["rewards"] = {
            name: reward_summary(reward(images, prompts).detach().cpu(), prompts, n_boot, seed)
            for name, reward in rewards.items()
        }
    if baseline is not None:
        base_images, _ = sample_images(baseline, prompts, config, seeds, batch_size)
        judge = judge if judge is not None else RaterPanel()
        if isinstance(judge, RaterPanel):
            win = panel_win_rate(judge, images, base_images, prompts, judge_group, n_boot=n_boot, seed=seed)
        else:
            if judge_group is not None:
                raise ValueError("judge_group: only a RaterPanel judge has rater groups")
            win = reward_win_rate(judge, images, base_images, prompts, n_boot=n_boot, seed=seed)
        out["win_rate"] = win.to_dict()
    net = None
    if diversity or fid:
        net = feature_net if feature_net is not None else load_feature_net()
    if diversity:
        pixels = pixel_features(images)
        features = extract_features(images, net)
        out["diversity"] = {
            "pixel": {
                "set": mean_pairwise_distance(pixels),
                "per_prompt": per_prompt_variety(pixels, prompts),
            },
            "features": {
                "set": mean_pairwise_distance(features),
                "per_prompt": per_prompt_variety(features, prompts),
            },
        }
    if fid:
        reference = reference_images
        if reference is None:
            reference = world_reference_images(prompts, int(images.shape[-1]), seed)
        out["fid"] = fid_kid(reference, images, net, seed=seed)
    if ratios is not None:
        out["kl"] = kl_from_log_probs(
            ratios, torch.zeros_like(ratios), dims=int(np.prod(model.latent_shape))
        ).to_dict()
    return out
