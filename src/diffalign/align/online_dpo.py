"""Online Diffusion-DPO: pairs sampled from the current policy, labelled, trained on, round after round.

Offline DPO learns from pairs some other model drew; its data drifts off-policy as the model moves.
Online DPO (as in D3PO, Yang et al. 2024, arXiv:2311.13231, and online/iterative DPO for language models)
instead repeats, for r = 0 .. rounds-1:
1. sample `pairs_per_round` pairs (two seeds, one prompt) from the policy at the start of the round;
2. label them: by the simulated rater panel (`labeller="panel"`, the default), or by any reward
   (`labeller=<reward spec>`; the higher reward wins, |difference| <= `tie_margin` is a tie);
3. run Diffusion-DPO (`train_dpo`, `dpo.steps` steps) on this round's pairs (or on every pair so far,
   `accumulate=True`), with the reference refreshed every `reference_every` rounds
   (`diffalign.align.rounds`).

Every labelled pair is kept in the run's own preference store (``RUN/prefs.db``, source "simulated"
for the panel, "online-reward" for a reward, keys ``<source>:<1000 * seed + round>:<i>``), so a user
can inspect, export or reuse them, and a resumed run adds nothing twice. What this leaves out: D3PO's
per-step (trajectory) DPO objective; the pairs here are trained with Diffusion-DPO's denoising loss.

Several processes (`accelerate launch`): each samples and labels its share of a round's pairs (pair i
on process i % N, the same pair as in one process) and writes them to the run's store (concurrent
writers are safe: SQLite's write lock, PostgreSQL's unique keys); every process then trains on the
whole round, data parallel or sharded (`runtime.sharding=fsdp`; `diffalign.align.rounds`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from diffalign.align.config_io import to_dict
from diffalign.align.dpo import DPOConfig
from diffalign.align.rounds import check_round_fields, process_share, run_rounds
from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.models.lora_merge import merged_for_sampling
from diffalign.prefs.pairs import PreferencePairs
from diffalign.prefs.records import CHOICE_IMAGE, CHOICE_TIE, NewComparison
from diffalign.prefs.simulate import SEED_STRIDE, check_share, encode_png, pair_prompts, simulate_preferences
from diffalign.prefs.store import PreferenceStore
from diffalign.world.raters import PanelConfig, RaterPanel

REWARD_SOURCE = "online-reward"


@dataclass
class OnlineDPOConfig:
    """An online DPO run.

    Attributes:
        dpo: the Diffusion-DPO config of every round: `dpo.model` is the starting model, `dpo.steps`
            the optimiser steps of each round, `dpo.runtime.seed` the run's seed (round r trains with
            seed + r).
        rounds: sampling-labelling-training rounds.
        pairs_per_round: pairs sampled and labelled in each round (the feedback budget is
            rounds * pairs_per_round labels).
        labeller: "panel" (the Shapes world's simulated raters, `diffalign.world.raters.RaterPanel()`),
            "panel:GROUP" (only that group's raters), "panel@PANEL.yaml" / "panel:GROUP@PANEL.yaml" (a
            panel file's raters, `diffalign.panels`), or a reward spec for
            `diffalign.rewards.registry.load_reward` (e.g. a reward-model folder, "shapes:faithfulness",
            "file.py:function").
        tie_margin: with a reward labeller, pairs whose rewards differ by at most this are ties (left
            out of training, kept in the store).
        reference_every: refresh the reference to the current policy every this many rounds (1: each
            round's reference is its starting model; 0: the starting model of the run throughout).
        accumulate: train each round on every pair labelled so far, not only on the round's own.
        prompts: a text file of Shapes-world prompts, one a line, to sample pairs for (None: every
            prompt of the world, uniformly over GenEval's six tasks).
        sample_steps: sampler steps for the pairs (0: the model family's default sampler's).
        guidance: classifier-free guidance scale for the pairs (None: the default sampler's).
        sample_batch: images per sampling call.
    """

    dpo: DPOConfig = field(default_factory=DPOConfig)
    rounds: int = 4
    pairs_per_round: int = 500
    labeller: str = "panel"
    tie_margin: float = 0.0
    reference_every: int = 1
    accumulate: bool = False
    prompts: str | None = None
    sample_steps: int = 0
    guidance: float | None = None
    sample_batch: int = 64

    def __post_init__(self) -> None:
        self.dpo = check_round_fields(self)
        if self.pairs_per_round < 1:
            raise ValueError(f"pairs_per_round must be >= 1, got {self.pairs_per_round}")
        if self.sample_batch < 2:
            raise ValueError(f"sample_batch must be >= 2 (two images a pair), got {self.sample_batch}")
        if self.tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0, got {self.tie_margin}")
        if not self.labeller.strip():
            raise ValueError("labeller must be 'panel' or a reward spec, got an empty string")


def sampler_for(model, steps: int, guidance: float | None) -> SamplerConfig:
    """The model family's default sampler with `steps` (when > 0) and `guidance` (when set)."""
    overrides: dict = {}
    if steps:
        overrides["num_steps"] = steps
    if guidance is not None:
        overrides["guidance_scale"] = guidance
    return SamplerConfig.for_prediction_type(model.prediction_type, **overrides)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file, one a line (blank lines skipped); errors name the file."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ValueError(f"prompts file {file}: {err.strerror or err}") from err
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {file}: no prompts in it")
    return prompts


def label_with_reward(
    model,
    reward: Callable,
    store: PreferenceStore,
    n_pairs: int,
    *,
    seed: int,
    reward_name: str,
    sampler_config: SamplerConfig,
    prompts: Sequence[str] | None = None,
    tie_margin: float = 0.0,
    batch_size: int = 64,
    share: tuple[int, int] = (0, 1),
) -> dict:
    """Sample n_pairs pairs from `model` (seeds and prompts as `simulate_preferences` draws them) and
    let `reward` choose: the higher reward wins, a difference <= tie_margin is a tie. Writes them to
    `store` (source "online-reward", keys ``online-reward:<seed>:<i>``); pairs already there are
    not sampled again; with `share` (index, count) only the pairs i with i % count == index are.
    Returns counts."""
    check_share(share)
    all_prompts = pair_prompts(n_pairs, prompts, seed)
    prefix = f"{REWARD_SOURCE}:{seed}:"
    existing = {c.key for c in store.comparisons(source=REWARD_SOURCE) if c.key.startswith(prefix)}
    todo = [i for i in range(share[0], n_pairs, share[1]) if f"{prefix}{i}" not in existing]
    per_call = max(1, batch_size // 2)
    ties = 0
    for start in range(0, len(todo), per_call):
        idx = todo[start : start + per_call]
        ps = [all_prompts[i] for i in idx]
        sa = [seed * SEED_STRIDE + 2 * i for i in idx]
        with torch.no_grad():
            with merged_for_sampling(model):  # LoRA adapters folded in while sampling (`lora_merge`)
                traj = sample(model, ps + ps, config=sampler_config, seeds=sa + [s + 1 for s in sa])
            images = (traj.images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            scores = reward(images.float() / 255.0, ps + ps).detach().float().cpu()
        a, b = images[: len(idx)], images[len(idx) :]
        items = []
        for k, i in enumerate(idx):
            diff = float(scores[k] - scores[len(idx) + k])
            tie = abs(diff) <= tie_margin
            ties += tie
            items.append(
                NewComparison(
                    prompt=ps[k],
                    images=[encode_png(a[k]), encode_png(b[k])],
                    choice=CHOICE_TIE if tie else CHOICE_IMAGE,
                    chosen=None if tie else (0 if diff > 0 else 1),
                    rater=reward_name,
                    source=REWARD_SOURCE,
                    key=f"{prefix}{i}",
                    meta={
                        "rewards": [float(scores[k]), float(scores[len(idx) + k])],
                        "seeds": [sa[k], sa[k] + 1],
                    },
                    where=f"online pair {i}",
                )
            )
        store.add(items)
    return {"sampled": len(todo), "ties": ties}


def is_panel_labeller(labeller: str) -> bool:
    """Whether `labeller` names simulated raters: "panel", "panel:GROUP", "panel@FILE", "panel:GROUP@FILE"."""
    return labeller == "panel" or labeller.startswith(("panel:", "panel@"))


def load_labelling_panel(labeller: str) -> RaterPanel:
    """The simulated raters of a panel labeller (`is_panel_labeller`): the default panel, or the panel
    file's after '@' (`diffalign.panels`); with ':GROUP' only that group's raters (as many raters as
    the whole panel, the other settings kept).

    Raises:
        RewardSpecError: no file after '@', a bad panel file, or a group the panel does not have.
    """
    from diffalign.align.config_io import ConfigError
    from diffalign.panels import load_panel_config
    from diffalign.rewards.registry import RewardSpecError

    head, at, panel_file = labeller.partition("@")
    _, colon, group = head.partition(":")
    if colon and not group.strip():
        raise RewardSpecError(f"labeller {labeller!r}: no group after ':' (give panel:GROUP)")
    group = group.strip()
    if at and not panel_file.strip():
        raise RewardSpecError(f"labeller {labeller!r}: no panel file after '@' (give panel@PANEL.yaml)")
    try:
        panel = load_panel_config(panel_file.strip()) if at else PanelConfig()
    except (ConfigError, OSError) as err:
        raise RewardSpecError(f"labeller {labeller!r}: {err}") from err
    if group:
        names = [g.name for g in panel.groups]
        if group not in names:
            raise RewardSpecError(
                f"labeller {labeller!r}: the panel has no group {group!r}; its groups are {', '.join(names)}"
            )
        panel = replace(panel, groups=[g for g in panel.groups if g.name == group])
    return RaterPanel(panel)


def load_labeller(config: OnlineDPOConfig) -> Callable | None:
    """The reward that labels the pairs, or None for simulated raters (`is_panel_labeller`).

    Raises:
        RewardSpecError: a reward spec that names nothing usable, or a module that cannot be imported.
    """
    if is_panel_labeller(config.labeller):
        return None
    from diffalign.rewards.registry import RewardSpecError, load_reward

    try:
        return load_reward(config.labeller)
    except ImportError as err:  # `module:function` naming a module that is not there
        raise RewardSpecError(f"labeller {config.labeller!r}: {err}") from err


def label_round(
    config: OnlineDPOConfig,
    model,
    store: PreferenceStore,
    n_pairs: int,
    *,
    seed: int,
    reward: Callable | None = None,
    prompts: Sequence[str] | None = None,
    share: tuple[int, int] = (0, 1),
    model_name: str | None = None,
    panel: RaterPanel | None = None,
) -> None:
    """Sample `n_pairs` pairs with `model` (the config's sampler) and label them into `store`: by the
    simulated raters `panel` (default: the default panel) when `reward` is None
    (`simulate_preferences`), else by `reward` (`label_with_reward`, the config's tie margin); `share`
    as there."""
    sampler = sampler_for(model, config.sample_steps, config.guidance)
    if reward is None:
        simulate_preferences(
            model,
            store,
            n_pairs,
            panel=panel,
            prompts=prompts,
            sampler_config=sampler,
            seed=seed,
            batch_size=config.sample_batch,
            model_name=model_name,
            share=share,
        )
    else:
        label_with_reward(
            model,
            reward,
            store,
            n_pairs,
            seed=seed,
            reward_name=config.labeller,
            sampler_config=sampler,
            prompts=prompts,
            tie_margin=config.tie_margin,
            batch_size=config.sample_batch,
            share=share,
        )


def round_seed(seed: int, index: int) -> int:
    """The labelling seed of round `index` (distinct pairs, prompts and rater draws per round)."""
    return 1000 * seed + index


def _keys_with_prefix(pairs: PreferencePairs, prefixes: Sequence[str]) -> PreferencePairs:
    """The pairs whose key starts with one of `prefixes`, ordered by (prefix, pair index): the order
    in which a single process labels them, whatever order several processes wrote them in."""
    order = {prefix: rank for rank, prefix in enumerate(prefixes)}
    chosen = []
    for i, key in enumerate(pairs.keys):
        prefix, _, number = key.rpartition(":")
        if prefix + ":" in order:
            chosen.append((order[prefix + ":"], int(number), i))
    return pairs.select([i for *_, i in sorted(chosen)])


def train_online_dpo(
    config: OnlineDPOConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    show_progress: bool = False,
    on_round: Callable[[dict], None] | None = None,
):
    """Run online DPO (module doc) into `run_dir`; returns the final model.

    Raises:
        PreferenceDataError: a round's pairs are all ties (nothing to train on).
        RunDirError: a fresh run into a used folder, a resume with another config.
        RewardSpecError: an unknown labeller.
    """
    run = Path(run_dir)
    record = {"trainer": "online-dpo", "config": to_dict(config)}
    prompts = read_prompts(config.prompts) if config.prompts else None
    reward = load_labeller(config)
    panel = load_labelling_panel(config.labeller) if reward is None else None
    source = "simulated" if reward is None else REWARD_SOURCE
    seed = config.dpo.runtime.seed

    def make_pairs(index: int, model, accelerator) -> tuple[PreferencePairs, dict]:
        with accelerator.main_process_first():  # the main process creates the store's tables
            run.mkdir(parents=True, exist_ok=True)
            store = PreferenceStore.open(run / "prefs.db")
        label_round(
            config,
            model,
            store,
            config.pairs_per_round,
            seed=round_seed(seed, index),
            reward=reward,
            prompts=prompts,
            share=process_share(accelerator),
            model_name=f"round-{index:02d}",
            panel=panel,
        )
        accelerator.wait_for_everyone()  # every process's share is in the store
        rounds = range(index + 1) if config.accumulate else [index]
        prefixes = [f"{source}:{round_seed(seed, r)}:" for r in rounds]
        pairs = _keys_with_prefix(store.pairs(size=model.image_shape[-1], source=source), prefixes)
        # Facts about the round's data, from the store (identical when an interrupted round resumes).
        own = _keys_with_prefix(pairs, prefixes[-1:])
        facts = {
            "labelled": len(own),
            "ties": int(own.is_tie.sum()),
            "labels_so_far": (index + 1) * config.pairs_per_round,
            # the pairs DPO trains on: ties count only when `dpo.soft_labels` keeps them
            "train_pairs": len(pairs) if config.dpo.soft_labels else len(pairs) - int(pairs.is_tie.sum()),
        }
        return pairs, facts

    return run_rounds(
        config.dpo,
        config.rounds,
        config.reference_every,
        run,
        make_pairs,
        record,
        resume=resume,
        show_progress=show_progress,
        on_round=on_round,
    )
