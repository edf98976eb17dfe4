"""Offline preference fine-tuning of diffusion models: Diffusion-DPO and Diffusion-KTO.

Diffusion-DPO (Wallace et al. 2023, arXiv:2311.12908) trains on pairs (prompt, winner, loser): both
images of a pair are noised with the *same* noise, at the *same* timestep, under the *same* prompt
dropout; policy and reference predict the target (noise, v or flow velocity) for both; the loss
(`diffalign.align.losses.diffusion_dpo_loss`) rewards the policy for lowering the winner's error more
than the loser's, relative to the reference. Diffusion-KTO (Li et al. 2024, arXiv:2404.04465) trains on
single images marked liked or disliked: the winners and the losers of pairs, taken apart, or unpaired
feedback (`diffalign.prefs.ratings.ImageRatings`, read from a JSONL or CSV file of rated images).

The reference is the model as loaded (`reference_predict`): a frozen copy for full fine-tuning, the
network with its LoRA adapters switched off when `lora_rank > 0` (no second copy). It is fixed before
any checkpoint is loaded, so a resumed run's reference is still the base model. The loop works on any
`DiffusionModel` (`policy_setup.py`): the tiny models, whose latents are the pixels, and diffusers
pipelines, whose images go through the VAE (`model.encode`) and whose prompts through their text
encoders (`model.encode_prompts`), one micro-batch at a time.

`train_dpo` is one explicit loop (read it top to bottom). What it shares with the other trainers lives
in small modules: `runtime` (Accelerate, seeding, the data-sharding rule), `run_dir` (the run folder,
atomic checkpoints), `tracking` (metrics.jsonl, trackers, progress bar), `guard` (NaN/inf stop).
Every step's examples, noise, timesteps and prompt dropout are a function of (seed, step) only, so a
resumed run reproduces the uninterrupted run step for step. Ties are left out, as in the paper, unless
`soft_labels` trains every pair towards its preference probability (ties at 1/2; `losses.py`), and
`label_smoothing` is conservative DPO's for noisy labels.
Online DPO (`online_dpo.py`) and SPIN-Diffusion (`spin.py`) run this trainer once per round on pairs
made by the current model (`rounds.py`), with `DPOConfig.reference` pointing at an earlier iterate.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from diffalign.align.checkpointing import (
    begin_run,
    loop_bookkeeping,
    resume_weights,
    save_final_model,
    save_training_checkpoint,
)
from diffalign.align.config_io import to_dict
from diffalign.align.losses import diffusion_dpo_loss, diffusion_kto_loss, per_sample_mse
from diffalign.align.policy_setup import adapter_options, policy_for
from diffalign.align.run_dir import RunDir, RunDirError, set_rng_state
from diffalign.align.runtime import (
    RuntimeConfig,
    epoch_indices,
    global_batch_slice,
    make_accelerator,
    prepare_training,
    seed_everything,
    step_generator,
)
from diffalign.align.sharding import check_sharding, whole_value
from diffalign.align.tracking import resolve_log_with
from diffalign.diffusion.protocol import Conditioning
from diffalign.diffusion.schedules import FLOW_TIME_DISTRIBUTIONS, training_target
from diffalign.models.diffusers_adapters.common import AdapterConfig
from diffalign.models.tokenizer import first_unreadable
from diffalign.prefs.mirror import draw_mirrors, mirror_images, mirror_prompts
from diffalign.prefs.pairs import PreferencePairs
from diffalign.prefs.ratings import ImageRatings
from diffalign.prefs.stored_pairs import StoredImages, StoredPairs

METHODS = ("dpo", "kto")

#: beta when the config leaves it unset, by (method, model family), set from the error scale of the
#: shipped tiny models (docs/align.md): their per-image errors on simulated pairs are ~0.002-0.015
#: (epsilon) and ~0.03-0.06 (flow velocity), so these values put 0.5 * beta * (error difference) at
#: O(0.1-1) in the first steps. Flow's is 4x smaller, as velocity errors are 5-10x larger (the
#: literature likewise: SD epsilon 5000, SD3 flow 100-2000). Not yet tuned by win rate (benchmarks/dpo.py).
DEFAULT_BETA: dict[tuple[str, str], float] = {
    ("dpo", "epsilon"): 2000.0,
    ("dpo", "v_prediction"): 2000.0,
    ("dpo", "flow"): 500.0,
    ("kto", "epsilon"): 1000.0,
    ("kto", "v_prediction"): 1000.0,
    ("kto", "flow"): 250.0,
}


@dataclass
class DPOConfig:
    """Everything a Diffusion-DPO / Diffusion-KTO run depends on.

    Attributes:
        method: "dpo" (pairs; Wallace et al. 2023) or "kto" (liked/disliked images; Li et al. 2024).
        model: the model to fine-tune: "base", "base-flow", a model / run folder, or a diffusers
            pipeline (a local folder or a Hugging Face id in the local cache; docs/diffusers.md).
        pipeline: options of a diffusers pipeline model (`AdapterConfig`: dtype, gradient
            checkpointing, channels_last, TF32, chunked VAE decoding, resolution, LoRA target modules);
            refused for a tiny model. Its `lora_rank` stays 0: LoRA is `lora_rank` below.
        beta: the KL weight. DPO uses the 0.5 * beta convention of the reference code
            (inside = -0.5 beta ((err_w - err_l) - (ref_w - ref_l))): Stable Diffusion uses 5000,
            flow models 100 to 2000. None picks `DEFAULT_BETA[(method, family)]`.
        kto_lambda_desirable: KTO's weight lambda_D of liked images.
        kto_lambda_undesirable: KTO's weight lambda_U of disliked images.
        steps: optimiser steps in total.
        batch_size: pairs (DPO) or images (KTO) per micro-batch on each process; the effective batch
            is batch_size * processes * runtime.gradient_accumulation_steps.
        lr: AdamW learning rate after the warm-up (constant afterwards, as in the reference code).
            1e-4 damaged the shipped tiny models within 20 steps (policy errors 3-6x the reference's,
            win rate vs the base 0.08); 1e-5 kept them within a few percent (docs/align.md).
        warmup_steps: linear learning-rate warm-up.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip (0 disables clipping; the norm is still logged).
        prompt_dropout: probability of training an example on the empty prompt (the pair shares it).
        flow_timesteps: "logit_normal" (SD3) or "uniform" training times for flow models.
        timestep_range: (lo, hi) fractions of the noise range to train on; drawn timesteps are mapped
            affinely into it (DDPM: t in [lo T, hi T); flow: t in [lo, hi]). (0, 1), the default, is
            the paper's. On the shipped epsilon model the pairs' gradient signal sits at low noise
            (docs/align.md: signal-to-noise of the DPO gradient by timestep range).
        sft_weight: lambda of a supervised term on the winners, lambda * 0.5 beta * mean(err_w - ref_w),
            added to the DPO loss (as RPO, Pang et al. 2024, adds the winners' NLL) against DPO's
            tendency to raise both errors; 0 (the default) is plain Diffusion-DPO. DPO's own weight on
            err_w is 0.5 beta * sigmoid(-inside), 0.25 beta at the start. With `soft_labels`, ties
            have no winner and add 0 to the mean.
        soft_labels: False (the paper's): ties are left out and every other pair trains its winner
            with label 1. True: every pair trains towards its preference probability with the
            Bradley-Terry cross-entropy (`losses.py`): a tie at 1/2, which holds the policy's
            preference between its two images at the reference's (PickScore's treatment of
            Pick-a-Pic's ties), and a pair given as a fraction (votes pooled outside diffalign) at that
            fraction. DPO only.
        label_smoothing: eps in [0, 0.5): every label p becomes p (1 - 2 eps) + eps, so a winner's 1
            becomes 1 - eps (conservative DPO, Mitchell 2023, for labels flipped with probability eps;
            ties stay 1/2). 0 (the default) is the paper's loss. DPO only.
        mirror_relations: mirror each example at random (`diffalign.prefs.mirror`): a pair's winner
            and loser (or a KTO image) flipped left-right with probability 0.5, with 'left'/'right'
            exchanged in the prompt, and independently upside down, with 'above'/'below' and
            'top'/'bottom' exchanged; the label is kept. Up to four views of every pair, for data
            whose preferences are symmetric under mirroring once the spatial words are exchanged
            (exactly so in the Shapes world; not for text in images or upright scenes). Off by default.
        lora_rank: 0 fine-tunes every weight; > 0 trains LoRA adapters of this rank (peft) and the
            reference is the adapters switched off.
        lora_alpha: LoRA scale numerator (0: equal to the rank).
        reference: the reference model ("base", "base-flow", a model or run folder); None: `model`
            itself as loaded. Online DPO and SPIN set it to an earlier iterate. Full fine-tuning only
            (with LoRA the reference is the adapters switched off).
        log_every: steps between metrics lines (metrics are averaged over the steps in between).
        checkpoint_every: steps between resumable checkpoints (0: only at the end or at `stop_after`).
        keep_checkpoints: how many checkpoints to keep.
        log_with: Accelerate trackers: "auto" (TensorBoard when installed), "none", or names such as
            "tensorboard", "wandb", "mlflow" (comma-separated).
        runtime: device, mixed precision, gradient accumulation and seed (`RuntimeConfig`).
    """

    method: str = "dpo"
    model: str = "base"
    pipeline: AdapterConfig = field(default_factory=AdapterConfig)
    beta: float | None = None
    kto_lambda_desirable: float = 1.0
    kto_lambda_undesirable: float = 1.0
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    prompt_dropout: float = 0.0
    flow_timesteps: str = "logit_normal"
    timestep_range: tuple[float, float] = (0.0, 1.0)
    sft_weight: float = 0.0
    soft_labels: bool = False
    label_smoothing: float = 0.0
    mirror_relations: bool = False
    lora_rank: int = 0
    lora_alpha: float = 0.0
    reference: str | None = None
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_with: str = "auto"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in (
            "warmup_steps",
            "checkpoint_every",
            "lora_rank",
            "lora_alpha",
            "weight_decay",
            "grad_clip",
            "kto_lambda_desirable",
            "kto_lambda_undesirable",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1], got {self.prompt_dropout}")
        if self.flow_timesteps not in FLOW_TIME_DISTRIBUTIONS:
            raise ValueError(
                f"flow_timesteps must be one of {FLOW_TIME_DISTRIBUTIONS}, got {self.flow_timesteps!r}"
            )
        self.timestep_range = tuple(float(x) for x in self.timestep_range)
        if len(self.timestep_range) != 2 or not 0.0 <= self.timestep_range[0] < self.timestep_range[1] <= 1.0:
            raise ValueError(
                f"timestep_range must be (lo, hi) with 0 <= lo < hi <= 1, got {self.timestep_range}"
            )
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.sft_weight > 0 and self.method != "dpo":
            raise ValueError(
                f"sft_weight is a term of the DPO loss (on the pairs' winners); method {self.method!r} has "
                f"none, so sft_weight={self.sft_weight} would be ignored: leave it at 0"
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"label_smoothing must be in [0, 0.5) (the probability that a label is flipped), got "
                f"{self.label_smoothing}"
            )
        if self.method != "dpo" and (self.soft_labels or self.label_smoothing > 0):
            raise ValueError(
                f"soft_labels and label_smoothing are options of the DPO loss (pairs); method "
                f"{self.method!r} trains single liked/disliked images and has no pair label to soften"
            )
        if self.reference is not None and self.lora_rank > 0:
            raise ValueError(
                "reference needs full fine-tuning (lora_rank=0): with LoRA the reference is the model "
                "with its adapters switched off"
            )
        if isinstance(self.runtime, dict):
            self.runtime = RuntimeConfig(**self.runtime)
        self.pipeline = adapter_options(self.pipeline)


class PreferenceDataError(ValueError):
    """The preference data cannot train this method (empty, only ties, wrong image size)."""


def check_prompts(
    model,
    prompts: Sequence[str],
    keys: Sequence[str] | None = None,
    name: str = "",
    source: str = "",
    places: Sequence[str] | None = None,
) -> None:
    """Refuse, before anything trains, a prompt that `model`'s tokenizer cannot read (a word outside a
    tiny model's Shapes-world vocabulary, too many words), naming the first example that has it (its
    comparison key when there is one; `source` says where the examples came from) and how many examples
    do. `name` is the model as the user gave it; `places`, where given, name the examples instead
    ("ratings.jsonl line 4"). Only tiny models' tokenizers refuse
    text; a diffusers pipeline's read any (truncating long prompts), so nothing is checked for them.

    Raises:
        PreferenceDataError: the prompt, the example and the tokenizer's reason.
    """
    found = first_unreadable(model, prompts)
    if found is None:
        return
    i, prompt, err = found
    key = keys[i] if keys is not None and i < len(keys) else ""
    where = f"comparison {key}" if key else f"example {i}"
    where = f"{source}, {where}" if source else where
    if places is not None and i < len(places) and places[i]:
        where = places[i]
    uses = sum(p == prompt for p in prompts)
    model_name = f"the model {name!r}" if name else "the model"
    raise PreferenceDataError(
        f"{where} ({uses} example{'s' if uses != 1 else ''} with this prompt): {model_name} cannot "
        f"read its prompt: {err}"
    ) from err


# --- data ------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The examples a run draws from, held as uint8 images (in memory, or read from the store as each
    batch indexes them: `diffalign.prefs.stored_pairs.StoredImages`).

    DPO: `images` are the winners and `others` the losers of N pairs. KTO: `images` are single images
    (the winners and the losers of the pairs, taken apart), `liked` says which are liked, `others` is None.

    Attributes:
        prompts: the distinct prompts; `prompt_index` points into them.
        prompt_index: [N] prompt of each example.
        images: uint8 [N, 3, H, W], or a `StoredImages` column of N images.
        others: the same for the DPO losers, or None.
        liked: [N] bool (KTO) or None.
        ties_dropped: ties left out of the pairs.
        fingerprint: sha256 of the examples (a resumed run refuses other data): of the pixels in
            memory, of the images' content hashes for stored images.
        labels: [N] float32 probability that `images[i]` is preferred to `others[i]` (DPO with
            `soft_labels` or `label_smoothing`; 1/2 for a tie), or None: every label 1.
        ties_kept: ties trained at 1/2 (`soft_labels`).
    """

    prompts: list[str]
    prompt_index: Tensor
    images: Tensor | StoredImages
    others: Tensor | StoredImages | None
    liked: Tensor | None
    ties_dropped: int
    fingerprint: str
    labels: Tensor | None = None
    ties_kept: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])


def pair_labels(prob_a: Tensor, soft_labels: bool, label_smoothing: float) -> Tensor | None:
    """[N] probability that each pair's first training image (its image A where A wins or ties, else
    B) is preferred: max(p, 1 - p) with `soft_labels`, else 1, then smoothed to
    p (1 - 2 eps) + eps; None when every label is exactly 1 (the paper's loss)."""
    p = prob_a.float()
    labels = torch.maximum(p, 1 - p) if soft_labels else torch.ones_like(p)
    if label_smoothing > 0:
        labels = labels * (1 - 2 * label_smoothing) + label_smoothing
    return None if bool((labels == 1).all()) else labels


def ratings_training_data(ratings: ImageRatings, method: str = "kto") -> TrainingData:
    """KTO's examples from unpaired feedback: each rated image liked or disliked as rated.

    Raises `PreferenceDataError` for DPO (ratings have no pairs) or no ratings."""
    if method != "kto":
        raise PreferenceDataError(
            f"per-image ratings compare no two images: method {method!r} trains on pairs; use KTO "
            "(`diffalign align kto --ratings`)"
        )
    if len(ratings) == 0:
        raise PreferenceDataError("the ratings are empty: KTO needs liked or disliked images")
    prompts = list(dict.fromkeys(ratings.prompts))
    lookup = {p: i for i, p in enumerate(prompts)}
    index = torch.tensor([lookup[p] for p in ratings.prompts], dtype=torch.long)
    return TrainingData(prompts, index, ratings.images, None, ratings.liked, 0, ratings.fingerprint())


def training_data(
    pairs: PreferencePairs | StoredPairs | ImageRatings,
    method: str = "dpo",
    *,
    soft_labels: bool = False,
    label_smoothing: float = 0.0,
) -> TrainingData:
    """Winners and losers of the non-tied pairs (DPO), or the same images as liked / disliked (KTO).
    With `soft_labels` (DPO) ties are kept, image A first, and `labels` holds every pair's
    probability (`DPOConfig.soft_labels`, `label_smoothing`). `StoredPairs` keep their images in the
    store until a batch reads them.

    `ImageRatings` (unpaired feedback) go to `ratings_training_data` (KTO only).

    Raises `PreferenceDataError` for empty or tie-only data (ties alone teach nothing: the soft loss's
    gradient is zero while the policy is the reference)."""
    if isinstance(pairs, ImageRatings):
        return ratings_training_data(pairs, method)
    if len(pairs) == 0:
        raise PreferenceDataError("the preference data is empty: DPO needs pairs with a winner")
    ties = int(pairs.is_tie.sum())
    if ties == len(pairs):
        raise PreferenceDataError(
            f"the preference data holds only ties ({ties} pairs): DPO and KTO need pairs with a winner"
        )
    keep_ties = soft_labels and method == "dpo"
    kept = pairs if keep_ties else pairs.without_ties()
    labels = pair_labels(kept.prob_a, soft_labels, label_smoothing) if method == "dpo" else None
    prompts = list(dict.fromkeys(kept.prompts))
    lookup = {p: i for i, p in enumerate(prompts)}
    index = torch.tensor([lookup[p] for p in kept.prompts], dtype=torch.long)
    digest = hashlib.sha256()
    digest.update(method.encode())
    digest.update("\n".join(kept.prompts).encode())
    if labels is not None:
        digest.update(labels.numpy().tobytes())
    if isinstance(kept, StoredPairs):
        a_wins = (kept.prob_a >= 0.5).tolist()
        pairs_ab = zip(kept.hashes_a, kept.hashes_b, a_wins, strict=True)
        winner_hashes, loser_hashes = zip(*[(a, b) if w else (b, a) for a, b, w in pairs_ab], strict=True)
        digest.update(f"stored images at {kept.size} px\n".encode())
        digest.update("\n".join(winner_hashes + loser_hashes).encode())
        winners, losers = kept.column(winner_hashes), kept.column(loser_hashes)
        both = kept.column(winner_hashes + loser_hashes) if method != "dpo" else None
    else:
        a_wins = (kept.prob_a >= 0.5)[:, None, None, None]
        winners = torch.where(a_wins, kept.images_a, kept.images_b).to(torch.uint8)
        losers = torch.where(a_wins, kept.images_b, kept.images_a).to(torch.uint8)
        digest.update(winners.contiguous().numpy().tobytes())
        digest.update(losers.contiguous().numpy().tobytes())
        both = None
    if method == "dpo":
        dropped = 0 if keep_ties else ties
        return TrainingData(
            prompts, index, winners, losers, None, dropped, digest.hexdigest(), labels, ties - dropped
        )
    n = len(kept)
    liked = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    return TrainingData(
        prompts,
        torch.cat([index, index]),
        torch.cat([winners, losers]) if both is None else both,
        None,
        liked,
        ties,
        digest.hexdigest(),
    )


@dataclass
class StepDraw:
    """The random choices of one optimiser step for its whole global batch (see runtime.py).

    Attributes:
        indices: [G] examples.
        noise: [G, C, H, W] noise (one per pair for DPO: winner and loser share it).
        t: [G] training timesteps (shared by a pair).
        drop: [G] bool, prompt replaced by the empty prompt (shared by a pair).
        flips: [G, 2] bool, left-right and upside-down flips (`mirror_relations`; shared by a pair),
            or None.
    """

    indices: Tensor
    noise: Tensor
    t: Tensor
    drop: Tensor
    flips: Tensor | None = None

    def rows(self, rows: slice) -> StepDraw:
        flips = None if self.flips is None else self.flips[rows]
        return StepDraw(self.indices[rows], self.noise[rows], self.t[rows], self.drop[rows], flips)


def draw_step(model, config: DPOConfig, n_examples: int, step: int, global_size: int) -> StepDraw:
    """Step `step`'s examples, noise, timesteps and prompt dropout: a function of (seed, step) only,
    drawn on the CPU so that every device and process count draws the same numbers."""
    seed = config.runtime.seed
    indices = epoch_indices(n_examples, seed, step * global_size, global_size)
    gen = step_generator(seed, step)
    noise = torch.randn((global_size, *model.latent_shape), generator=gen)
    if model.prediction_type == "flow":
        t = model.schedule.sample_training_timesteps(
            global_size, generator=gen, distribution=config.flow_timesteps
        )
    else:
        t = model.schedule.sample_training_timesteps(global_size, generator=gen)
    t = restrict_timesteps(t, config.timestep_range, model)
    drop = torch.rand(global_size, generator=gen) < config.prompt_dropout
    flips = draw_mirrors(global_size, gen) if config.mirror_relations else None
    return StepDraw(indices, noise, t, drop, flips)


def restrict_timesteps(t: Tensor, timestep_range: tuple[float, float], model) -> Tensor:
    """Map drawn training times affinely into `timestep_range` (fractions of the noise range): DDPM
    timesteps in [0, T) go to [lo T, hi T) (floored), flow times in [0, 1] to [lo, hi]."""
    lo, hi = timestep_range
    if (lo, hi) == (0.0, 1.0):
        return t
    if model.prediction_type == "flow":
        return lo + (hi - lo) * t
    total = model.schedule.num_train_timesteps
    return (lo * total + (hi - lo) * t).floor().clamp(max=total - 1)


@dataclass
class DenoisingBatch:
    """Inputs and targets of one forward pass. For DPO the first half holds the winners and the second
    half the losers of the same pairs, with the same noise, timesteps and prompt tokens.

    Attributes:
        x_t: [M, C, H, W] noisy inputs.
        t: [M] timesteps.
        target: [M, C, H, W] regression targets (`training_target`).
        cond: [M] encoded prompts (the empty prompt where dropped).
    """

    x_t: Tensor
    t: Tensor
    target: Tensor
    cond: Conditioning


def denoising_batch(model, x0: Tensor, noise: Tensor, t: Tensor, cond: Conditioning) -> DenoisingBatch:
    """Noise x0 at t and compute the model family's target (noise, v, or the flow velocity)."""
    x_t = model.schedule.add_noise(x0, noise, t)
    target = training_target(x0, noise, t, model.prediction_type, model.schedule)
    return DenoisingBatch(x_t, t, target, cond)


def _examples(model, data: TrainingData, draw: StepDraw) -> tuple[Tensor, Conditioning]:
    """(indices, encoded prompts) of `draw`'s examples, the empty prompt where dropped. Prompts are
    encoded per micro-batch (a table of every prompt's text states would not fit beside a large
    model), without gradients: the text encoders are frozen."""
    idx = draw.indices
    prompts = [
        "" if dropped else data.prompts[int(p)]
        for p, dropped in zip(data.prompt_index[idx].tolist(), draw.drop.tolist())
    ]
    if draw.flips is not None:
        prompts = mirror_prompts(prompts, draw.flips)
    with torch.no_grad():
        return idx, model.encode_prompts(prompts)


def _latents(model, images: Tensor, flips: Tensor | None = None) -> Tensor:
    """uint8 images -> the model's latents (the pixels for a tiny model, the frozen VAE's otherwise),
    the images flipped first where `flips` says (rows of `flips` repeat over the images' rows)."""
    if flips is not None:
        images = mirror_images(images, flips.repeat(images.shape[0] // flips.shape[0], 1))
    with torch.no_grad():
        return model.encode(images.to(model.device).float() / 255)


def prefetch_examples(data: TrainingData, indices: Tensor) -> None:
    """Start reading these examples' images in the background (stored images only)."""
    for column in (data.images, data.others):
        if isinstance(column, StoredImages):
            column.prefetch(indices)


def close_examples(data: TrainingData) -> None:
    """Stop the background readers of stored images."""
    for column in (data.images, data.others):
        if isinstance(column, StoredImages):
            column.close()


def pair_batch(model, data: TrainingData, draw: StepDraw) -> DenoisingBatch:
    """The DPO batch of `draw`: winners then losers, sharing noise, timestep and prompt dropout. The
    examples are taken from `data` where it is (the CPU) and only the batch moves to the model's device."""
    device = model.device
    idx, cond = _examples(model, data, draw)
    x0 = _latents(model, torch.cat([data.images[idx], data.others[idx]]), draw.flips)
    noise = draw.noise.to(device)
    t = draw.t.to(device)
    return denoising_batch(
        model, x0, torch.cat([noise, noise]), torch.cat([t, t]), Conditioning.cat([cond, cond])
    )


def image_batch(model, data: TrainingData, draw: StepDraw) -> tuple[DenoisingBatch, Tensor]:
    """The KTO batch of `draw`: single images with their own noise, and their like/dislike labels."""
    device = model.device
    idx, cond = _examples(model, data, draw)
    x0 = _latents(model, data.images[idx], draw.flips)
    batch = denoising_batch(model, x0, draw.noise.to(device), draw.t.to(device), cond)
    return batch, data.liked[idx].to(device)


# --- losses of one micro-batch ---------------------------------------------------------------------

DPO_METRICS = ("loss", "implicit_acc", "reward_margin", "err_w", "err_l", "ref_err_w", "ref_err_l")
#: With soft labels the micro-batches' `implicit_acc` and `reward_margin` entries are sums over the
#: decisive pairs divided by the micro-batch size, and these two more are kept: the share of decisive
#: pairs and the summed |inside| of the ties over the micro-batch size. `finish_soft_metrics` turns the
#: window's means into per-decisive-pair and per-tie values (ratios of means: exact over micro-batches
#: of equal size).
SOFT_DPO_METRICS = (*DPO_METRICS, "decisive_share", "tie_abs_margin")
KTO_METRICS = ("loss", "implicit_acc", "reference_point", "err", "ref_err")


def _errors(model, unet, batch: DenoisingBatch) -> tuple[Tensor, Tensor]:
    """Per-sample errors of the policy (through `unet`, with gradients) and of the reference."""
    pred = model.call_network(unet, batch.x_t, batch.t, batch.cond)
    ref = model.reference_predict(batch.x_t, batch.t, batch.cond)
    return per_sample_mse(pred, batch.target), per_sample_mse(ref, batch.target)


def dpo_micro_loss(
    model, unet, batch: DenoisingBatch, beta: float, sft_weight: float = 0.0, labels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(loss, metrics) of one DPO micro-batch (winners first, losers second): metrics
    [len(DPO_METRICS)], or [len(SOFT_DPO_METRICS)] when `labels` (the pairs' soft labels, see
    `training_data`) are given. With `sft_weight` > 0 the winners' supervised term of
    `DPOConfig.sft_weight` is added (ties have no winner: their terms are 0)."""
    err, ref = _errors(model, unet, batch)
    half = err.shape[0] // 2
    out = diffusion_dpo_loss(err[:half], err[half:], ref[:half], ref[half:], beta, labels)
    loss = out.loss
    if sft_weight > 0:
        gap = err[:half] - ref[:half]
        if labels is not None:
            gap = gap * out.decisive
        loss = loss + sft_weight * 0.5 * beta * gap.mean()
    if labels is None:
        acc, margin, extra = out.implicit_acc, out.reward_margin.detach(), []
    else:
        decisive = out.decisive.float()
        signed = out.signed_inside.detach()
        acc = ((signed > 0).float() * decisive).mean()
        margin = (signed * decisive).mean()
        extra = [decisive.mean(), (signed.abs() * (1 - decisive)).mean()]
    metrics = torch.stack(
        [
            loss.detach(),
            acc,
            margin,
            err[:half].detach().mean(),
            err[half:].detach().mean(),
            ref[:half].mean(),
            ref[half:].mean(),
            *extra,
        ]
    )
    return loss, metrics


def finish_soft_metrics(line: dict) -> dict:
    """Turn a soft-label metrics line's window means (`SOFT_DPO_METRICS`) into implicit accuracy and
    reward margin per decisive pair and |inside| per tie (None where the window had none)."""
    share = line["decisive_share"]
    for key in ("implicit_acc", "reward_margin"):
        line[key] = line[key] / share if share > 0 else None
    line["tie_abs_margin"] = line["tie_abs_margin"] / (1 - share) if share < 1 else None
    return line


def kto_micro_loss(model, unet, batch: DenoisingBatch, liked: Tensor, beta: float, config: DPOConfig):
    """(loss, metrics [len(KTO_METRICS)]) of one KTO micro-batch."""
    err, ref = _errors(model, unet, batch)
    out = diffusion_kto_loss(
        err, ref, liked, beta, config.kto_lambda_desirable, config.kto_lambda_undesirable
    )
    metrics = torch.stack(
        [out.loss.detach(), out.implicit_acc(liked), out.reference_point, err.detach().mean(), ref.mean()]
    )
    return out.loss, metrics


def learning_rate(step: int, config: DPOConfig) -> float:
    """Linear warm-up to `lr`, then constant (the Diffusion-DPO reference code's schedule)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


def resolved_beta(config: DPOConfig, prediction_type: str) -> float:
    return config.beta if config.beta is not None else DEFAULT_BETA[(config.method, prediction_type)]


# --- the training loop -----------------------------------------------------------------------------


def train_dpo(
    config: DPOConfig,
    pairs: PreferencePairs | StoredPairs | ImageRatings,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_log: Callable[[dict], None] | None = None,
    *,
    data_spec: dict | None = None,
    show_progress: bool = False,
    model=None,
    extend: bool = False,
):
    """Fine-tune `config.model` on `pairs` with Diffusion-DPO (or KTO); returns the trained model.

    Writes the run folder (`diffalign.align.run_dir`), whose `model/` is the final model. Under
    `runtime.sharding=fsdp` the returned model's network stays sharded across the processes (every
    process must run it together); `load_model(run_dir)` gives a whole copy.

    Args:
        config: the run's config.
        pairs: the preference pairs (ties are left out unless `soft_labels`); images must have the
            model's size. `StoredPairs` (`PreferenceStore.pair_references`) read each batch's images
            from the store when it is drawn, for preference sets larger than memory. KTO also takes
            `ImageRatings` (unpaired like/dislike feedback, `diffalign.prefs.ratings`).
        run_dir: the run folder.
        resume: continue from the latest checkpoint in `run_dir`; refuses a different config or data.
        stop_after: stop (with a checkpoint) after this many steps in total, as an interruption would.
        on_log: called with every metrics record on the main process.
        data_spec: where the pairs came from (e.g. {"store": path}), recorded in config.json.
        show_progress: a rich progress bar on the main process.
        model: `config.model` already loaded (same pipeline options, on the trainer's device, not yet
            changed), trained in place instead of loading it again (online DPO and SPIN pass the
            model that sampled the round's pairs).
        extend: resume a run with a longer `steps` than it was started with (a completed run
            continues from its final checkpoint; `diffalign.align.run_dir`, "Extending a run").

    Raises:
        PreferenceDataError: empty or tie-only data, images of another size than the model's.
        RunDirError: a fresh run into a used folder, a resume without a run or with another config.
        NonFiniteError: a loss or gradient norm became NaN or inf (the last good checkpoint is kept).
        ValueError: `runtime.sharding=fsdp` with one process or LoRA.
    """
    run = RunDir(run_dir)
    data = training_data(
        pairs, config.method, soft_labels=config.soft_labels, label_smoothing=config.label_smoothing
    )

    # 1. Accelerate, seeding, the model and its reference.
    accelerator = make_accelerator(config.runtime, resolve_log_with(config.log_with), run.logs_dir)
    seed_everything(config.runtime.seed)
    model = policy_for(config, accelerator.device, loaded=model)
    check_sharding(config.runtime, num_processes=accelerator.num_processes, lora=model.lora)
    if tuple(data.images.shape[1:]) != tuple(model.image_shape):
        raise PreferenceDataError(
            f"the preference images are {tuple(data.images.shape[1:])} but the model {config.model!r} "
            f"works on {tuple(model.image_shape)}; load the store with size={model.image_shape[-1]}"
        )
    if isinstance(pairs, ImageRatings):
        check_prompts(model, pairs.prompts, name=config.model, places=pairs.where)
    else:
        kept = torch.ones(len(pairs), dtype=torch.bool) if data.ties_kept else ~pairs.is_tie
        check_prompts(
            model,
            [p for p, k in zip(pairs.prompts, kept.tolist(), strict=True) if k],
            [key for key, k in zip(pairs.keys, kept.tolist(), strict=True) if k],
            config.model,
            source=f"store {data_spec['store']}" if data_spec and data_spec.get("store") else "",
        )
    beta = resolved_beta(config, model.prediction_type)
    record = {
        "trainer": config.method,
        "config": to_dict(config),
        "model": {"spec": config.model, "prediction_type": model.prediction_type},
        "data": {
            **(data_spec or {}),
            "examples": len(data),
            "ties_dropped": data.ties_dropped,
            "ties_kept": data.ties_kept,
            **(
                {}
                if data.liked is None
                else {"liked": int(data.liked.sum()), "disliked": int((~data.liked).sum())}
            ),
            "fingerprint": data.fingerprint,
        },
        "resolved": {"beta": beta},
    }
    begin_run(run, record, resume, accelerator, extend=extend)
    network = model.denoiser
    network.train()

    # 2. Resume: trainable weights before sharding and `prepare`, optimiser state and RNG after them.
    num_processes = accelerator.num_processes
    accumulation = config.runtime.gradient_accumulation_steps
    global_size = config.batch_size * num_processes * accumulation
    soft = data.labels is not None
    names = (SOFT_DPO_METRICS if soft else DPO_METRICS) if config.method == "dpo" else KTO_METRICS
    window = {"sums": torch.zeros(len(names) + 1), "micro": 0, "steps": 0}  # + grad_norm
    start = 0
    checkpoint = None
    if resume or extend:
        checkpoint = resume_weights(run, record, accelerator, network, extend=extend)
        start = checkpoint.step
        if checkpoint.data_cursor != start * global_size:
            raise RunDirError(
                f"checkpoint {checkpoint.path} consumed {checkpoint.data_cursor} examples in {start} steps, "
                f"a global batch of {checkpoint.data_cursor // max(1, start)}; this run's is {global_size} "
                f"({num_processes} processes x {accumulation} accumulation x {config.batch_size}): resume "
                "with the same number of processes"
            )
    unet, optimizer, params = prepare_training(accelerator, model, config, checkpoint)
    if checkpoint is not None:
        if checkpoint.rng is not None:
            set_rng_state(checkpoint.rng)
        window = checkpoint.process_state.get("window", window)

    # 3. The data stays on the CPU as uint8 images; each micro-batch moves to the device and is
    # encoded when drawn (a preference set of large images does not fit beside the model).
    device = accelerator.device
    sums = window["sums"].to(device)
    n_micro, n_steps = int(window["micro"]), int(window["steps"])

    end, guard, tracker = loop_bookkeeping(
        accelerator, run, config.method, record, config.steps, start, stop_after, show_progress
    )
    started = time.perf_counter()
    done = start

    def my_rows(draw: StepDraw, micro: int) -> StepDraw:
        return draw.rows(
            global_batch_slice(micro, accelerator.process_index, num_processes, config.batch_size)
        )

    drawn: dict[int, StepDraw] = {}  # a step drawn ahead to prefetch its images

    def prefetch(step: int) -> None:
        """Start reading step `step`'s images of this process when they are streamed from the store."""
        if step < end and isinstance(data.images, StoredImages):
            drawn[step] = draw_step(model, config, len(data), step, global_size)
            for micro in range(accumulation):
                prefetch_examples(data, my_rows(drawn[step], micro).indices)

    try:
        prefetch(start)
        for step in range(start, end):
            # 4. The step's global batch (a function of seed and step); this process takes its rows.
            draw = drawn.pop(step, None) or draw_step(model, config, len(data), step, global_size)
            prefetch(step + 1)  # streamed images: the next step's are read while this one computes
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            for micro in range(accumulation):
                mine = my_rows(draw, micro)
                # `accumulate` syncs gradients across processes, and lets the optimiser step, only on
                # the last micro-batch; `backward` divides the loss by the accumulation steps.
                with accelerator.accumulate(unet):
                    with accelerator.autocast():
                        if config.method == "dpo":
                            labels = None if not soft else data.labels[mine.indices].to(device)
                            loss, metrics = dpo_micro_loss(
                                model, unet, pair_batch(model, data, mine), beta, config.sft_weight, labels
                            )
                        else:
                            batch, liked = image_batch(model, data, mine)
                            loss, metrics = kto_micro_loss(model, unet, batch, liked, beta, config)
                    guard.observe("loss", loss, step + 1)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, config.grad_clip or math.inf)
                        grad_norm = whole_value(grad_norm)  # a DTensor under FSDP
                        guard.observe("gradient norm", grad_norm, step + 1)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                sums[: len(names)] += metrics.float()
                n_micro += 1
            sums[len(names)] += grad_norm.float()
            n_steps += 1
            done = step + 1
            tracker.advance(done)

            # 5. Metrics: averaged over the micro-batches since the last line, and over processes.
            # (Not at `stop_after`: the log of an interrupted and resumed run equals an uninterrupted one.)
            if done % config.log_every == 0 or done == config.steps:
                guard.check(run.latest_checkpoint())
                mean = accelerator.reduce(sums.clone(), reduction="mean")
                record_line = {"step": done, "lr": optimizer.param_groups[0]["lr"]}
                record_line.update({k: float(mean[i]) / n_micro for i, k in enumerate(names)})
                record_line["grad_norm"] = float(mean[len(names)]) / n_steps
                if soft and config.method == "dpo":
                    finish_soft_metrics(record_line)
                record_line["seconds_per_step"] = (time.perf_counter() - started) / max(1, done - start)
                tracker.log(record_line)
                if on_log is not None and accelerator.is_main_process:
                    on_log(record_line)
                sums.zero_()
                n_micro = n_steps = 0

            # 6. Checkpoint (never after a non-finite value): every process writes its own state.
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == end:
                guard.check(run.latest_checkpoint())
                save_training_checkpoint(
                    run,
                    accelerator,
                    done,
                    network=network,
                    optimizer=optimizer,
                    data_cursor=done * global_size,
                    record=record,
                    keep=config.keep_checkpoints,
                    process_state={"window": {"sums": sums.cpu(), "micro": n_micro, "steps": n_steps}},
                )
    finally:
        tracker.close()
        close_examples(data)

    # 7. The final model folder (what `load_model(run_dir)` and `diffalign sample --model` read).
    save_final_model(run, accelerator, guard, model, done, config.steps)
    network.eval()
    return model
