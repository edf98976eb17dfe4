"""Bradley–Terry training of a learned reward model on labelled pairs.

Bradley and Terry (1952) model a choice between A and B as P(A > B) = sigmoid(r(A) - r(B)). The loss is
the soft-label cross-entropy PickScore (Kirstain et al. 2023) trains with, ties counting half for each
side:

    loss = -[p log sigmoid(r_A - r_B) + (1 - p) log sigmoid(r_B - r_A)],  p = prob_a in {1, 0, 0.5},

averaged over the pairs of a batch. With p = 0.5 the loss is minimised at r_A = r_B, so a tie pulls the
two rewards together. The loop below is explicit: seeded shuffling, AdamW with warm-up and cosine
decay, gradient clipping, a held-out evaluation after every epoch, early stopping on the held-out loss
(the best epoch's weights are kept), and an error on the first non-finite loss.

Three options regularise fine-tuning of a pretrained model on few pairs (all off by default):
`freeze_encoder_epochs` trains the head alone first (linear probing, then fine-tuning: Kumar et al.
2022, "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution"), `ema_decay`
keeps an exponential moving average of the weights (Polyak and Juditsky 1992), which is what is
evaluated and returned, and `matching_weight` adds the world-caption matching loss of the pretraining
to every step. On the benchmark's 2,000 base-model pairs none of them measurably changed the held-out
accuracy (docs/reward_models.md).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.devices import resolve_device
from diffalign.prefs.mirror import draw_mirrors, mirror_images, mirror_prompts
from diffalign.prefs.pairs import PreferencePairs
from diffalign.rewards.learned import LearnedReward, RewardModelConfig, build_reward_model
from diffalign.world.counterfactual import counterfactual_scenes


class PreferenceDataError(ValueError):
    """The pairs cannot train a reward model (none at all, or only ties)."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class RewardTrainConfig:
    """How a reward model is trained.

    Attributes:
        lr: AdamW peak learning rate.
        weight_decay: AdamW decoupled weight decay.
        epochs: passes over the training pairs (upper bound when early stopping is on).
        max_steps: stop after this many optimiser steps (None: no limit beyond `epochs`).
        batch_size: pairs per step (each step scores 2 x batch_size images).
        warmup_steps: linear learning-rate warm-up; afterwards cosine decay to `min_lr_ratio` x lr.
        min_lr_ratio: the final learning rate as a fraction of `lr`.
        grad_clip: clip the global gradient norm to this (0: no clipping).
        held_out_fraction: fraction of the pairs kept aside for early stopping and reporting (0: none;
            ignored when `train_reward_model` is given `held_out` pairs explicitly).
        patience: stop when the held-out loss has not improved for this many epochs (0: never stop
            early); the weights of the best epoch are restored at the end.
        swap_ab: exchange A and B (and p with 1 - p) in a random half of every batch. The BT loss on
            r_A - r_B is symmetric, so this changes nothing for this model; it is kept for heads that
            see both images at once and as a guard against a position bias in the data. Horizontal or
            vertical flips are not offered: positions carry meaning in this world ("left of").
        shift_pixels: translate every image by up to this many pixels (white fill), independently per
            image: object positions relative to each other are unchanged, so labels are preserved.
        mirror_relations: mirror each training pair at random (`diffalign.prefs.mirror`): both
            images flipped left-right with probability 0.5, with 'left' and 'right' exchanged in the
            prompt, and (independently) upside down, with 'above'/'below' and 'top'/'bottom'
            exchanged; the label is kept. Right where what the raters value is symmetric under
            mirroring once the spatial words are exchanged: exactly so in the Shapes world, not in
            every image domain (text in images, upright scenes), hence off by default.
        group_dropout: when rater-conditioned, the fraction of training pairs whose group is replaced
            by the pooled entry, so the pooled entry learns the population's preferences.
        seed: seeds the initialisation, the split, the shuffling and the augmentations.
        device: 'cpu', 'cuda', 'auto' (CUDA when available).
        eval_batch_size: pairs per forward pass when evaluating.
        pretrain_steps: steps of world-caption pretraining before the preference data (0: none): each
            step is a Bradley–Terry batch preferring a Shapes-world rendering of the prompt to a
            rendering of another prompt (`pretrain_matching`). It teaches the encoders what the
            words look like from the world's captioned renderings, as real reward models start from
            CLIP or BLIP; it never sees a rater's label.
        pretrain_degrade: strength of the random degradation of the pretraining renderings (and of
            the `matching_weight` batches): each image is blurred by a Gaussian of standard deviation
            uniform in [0, 1.5 x pretrain_degrade] pixels and gets pixel noise of standard deviation
            uniform in [0, 0.1 x pretrain_degrade], so that what the encoders learn from clean
            renderings carries over to a diffusion model's imperfect samples (domain randomisation,
            Tobin et al. 2017). 0: clean renderings.
        pretrain_counterfactual: the fraction of the pretraining (and `matching_weight`) pairs whose
            other image is the prompt's own scene edited to fail it (`diffalign.world.counterfactual`:
            the relation broken, colours exchanged between the objects, one object removed, ...)
            instead of another prompt's scene: hard negatives in the manner of NegCLIP, which hold
            the same objects and differ only in the detail the prompt fixes, as the two images of a
            preference pair usually do. 0: none (the other prompt's scene, half of them near misses).
        pretrain_cosine: decay the pretraining learning rate after its warm-up by a cosine to
            `min_lr_ratio` x lr over the `pretrain_steps` (as the preference training does) instead
            of keeping it constant at lr.
        freeze_encoder_epochs: for this many epochs at the start of the preference training, only
            the head (`image_proj`, `fuse`, `out`, the group table) is trained; the prompt encoder and
            the conv stages (FiLM included) stay frozen, then everything trains (0: never frozen; a
            value >= `epochs`: the head alone, always). Meant for a pretrained model
            (`pretrain_steps` or `initial`): the head first adapts to the preference data, so that
            fine-tuning starts from small errors and distorts the pretrained features less.
        ema_decay: when > 0, keep an exponential moving average of the weights, updated after every
            optimiser step as ema = ema_decay * ema + (1 - ema_decay) * weights, starting from the
            weights training starts from (so it also pulls towards a pretrained model). The held-out
            evaluation, early stopping and the returned model use the averaged weights. 0: off.
            The average spans about 1 / (1 - ema_decay) steps.
        matching_weight: when > 0, every preference step also takes a world-caption matching batch
            (the `pretrain_steps` objective, `batch_size` pairs) and adds matching_weight x its loss,
            so that fine-tuning keeps what pretraining taught (as InstructGPT mixes pretraining
            gradients into its RL fine-tuning, Ouyang et al. 2022). Doubles the cost of a step.
            0: off.
        model: the architecture (`RewardModelConfig`); groups are filled in for rater conditioning.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-2
    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 64
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    held_out_fraction: float = 0.1
    patience: int = 5
    swap_ab: bool = True
    shift_pixels: int = 1
    mirror_relations: bool = False
    group_dropout: float = 0.2
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 256
    pretrain_steps: int = 0
    pretrain_degrade: float = 0.0
    pretrain_counterfactual: float = 0.0
    pretrain_cosine: bool = False
    freeze_encoder_epochs: int = 0
    ema_decay: float = 0.0
    matching_weight: float = 0.0
    model: RewardModelConfig = field(default_factory=RewardModelConfig)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in [0, 1), got {self.held_out_fraction}")
        if not 0.0 <= self.group_dropout <= 1.0:
            raise ValueError(f"group_dropout must be in [0, 1], got {self.group_dropout}")
        if not 0 <= self.pretrain_counterfactual <= 1:
            raise ValueError(f"pretrain_counterfactual must be in [0, 1], got {self.pretrain_counterfactual}")
        if self.pretrain_degrade < 0:
            raise ValueError(f"pretrain_degrade must be >= 0, got {self.pretrain_degrade}")
        if self.freeze_encoder_epochs < 0:
            raise ValueError(f"freeze_encoder_epochs must be >= 0, got {self.freeze_encoder_epochs}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.matching_weight < 0:
            raise ValueError(f"matching_weight must be >= 0, got {self.matching_weight}")


@dataclass
class TrainResult:
    """What training produced.

    Attributes:
        model: the trained reward (weights of the best held-out epoch when there is a held-out set).
        history: one record per epoch: epoch, step, train_loss, held_out_loss, held_out_accuracy, lr,
            elapsed_s (held-out entries are None without a held-out set).
        best_epoch: the epoch whose weights were kept.
        stopped_early: whether early stopping ended training.
        train_pairs: the pairs trained on.
        held_out: the held-out pairs (None when there were none).
    """

    model: LearnedReward
    history: list[dict]
    best_epoch: int
    stopped_early: bool
    train_pairs: PreferencePairs
    held_out: PreferencePairs | None


def bt_loss(margin: Tensor, prob_a: Tensor, reduction: str = "mean") -> Tensor:
    """Soft-label Bradley–Terry cross-entropy of `margin` = r_A - r_B against P(A preferred) = `prob_a`."""
    loss = -(prob_a * F.logsigmoid(margin) + (1 - prob_a) * F.logsigmoid(-margin))
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def check_trainable(pairs: PreferencePairs, what: str = "pairs") -> None:
    """Refuse data a reward model cannot learn from, with a message saying why."""
    if len(pairs) == 0:
        raise PreferenceDataError(f"no preference {what} to train on")
    if bool(pairs.is_tie.all()):
        raise PreferenceDataError(
            f"all {len(pairs)} preference {what} are ties; "
            "a reward model needs at least one pair with a winner"
        )


def to_float(images: Tensor, device: torch.device) -> Tensor:
    """uint8 [N,3,H,W] -> float [0,1] on `device` (float input is passed through)."""
    images = images.to(device)
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def shift_images(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by integer (dx, dy) in [-max_shift, max_shift], filling with white."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    pad = F.pad(images, (max_shift,) * 4, value=1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([pad[i, :, dy : dy + h, dx : dx + w] for i, (dx, dy) in enumerate(offs)])


@torch.no_grad()
def score_pairs(
    model: LearnedReward,
    pairs: PreferencePairs,
    *,
    groups: Sequence[str | None] | str | None = "pairs",
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Rewards (r_A, r_B) [N] of every pair on the CPU. `groups='pairs'` scores each pair for its own
    rater group (a rater-conditioned model); None scores everything with the pooled reward."""
    was_training = model.net.training
    model.eval()
    ra, rb = [], []
    for start in range(0, len(pairs), batch_size):
        sl = slice(start, start + batch_size)
        prompts = pairs.prompts[sl]
        if isinstance(groups, str) and groups == "pairs":
            g = pairs.groups[sl]
        elif groups is None or isinstance(groups, str):
            g = groups
        else:
            g = list(groups)[sl]
        gid = model.group_ids(g, len(prompts))
        a = to_float(pairs.images_a[sl], model.device)
        b = to_float(pairs.images_b[sl], model.device)
        r = model.forward(
            torch.cat([a, b]), prompts + prompts, None if gid is None else torch.cat([gid, gid])
        )
        ra.append(r[: len(prompts)].cpu())
        rb.append(r[len(prompts) :].cpu())
    model.train(was_training)
    return torch.cat(ra), torch.cat(rb)


def pair_accuracy(margin: Tensor, prob_a: Tensor) -> float:
    """Fraction of non-tie pairs whose winner has the higher reward (an exact reward tie counts half)."""
    keep = prob_a != 0.5
    if not bool(keep.any()):
        return float("nan")
    won = torch.where(prob_a[keep] > 0.5, margin[keep], -margin[keep])
    return float(((won > 0).float() + 0.5 * (won == 0).float()).mean())


def evaluate_pairs(model: LearnedReward, pairs: PreferencePairs, batch_size: int = 256) -> dict:
    """Held-out BT loss (ties included) and pairwise accuracy (ties left out), each pair scored for its
    own group when the model is rater-conditioned."""
    ra, rb = score_pairs(model, pairs, batch_size=batch_size)
    margin = ra - rb
    return {"loss": float(bt_loss(margin, pairs.prob_a)), "accuracy": pair_accuracy(margin, pairs.prob_a)}


class WeightEMA:
    """An exponential moving average of a module's floating-point weights and buffers.

    `update()` sets every averaged tensor to decay * average + (1 - decay) * current; `state_dict()`
    is a state dict of the module with the averaged values (integer entries copied as they are).
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.module = module
        self.decay = decay
        self.average = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        for key, value in self.module.state_dict().items():
            if value.is_floating_point():
                self.average[key].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
            else:
                self.average[key].copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.average.items()}


def _lr_factor(step: int, total: int, config: RewardTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def near_miss_prompts(prompts: list[str], tags: list[str], max_words: int = 2) -> list[Tensor]:
    """For each prompt, the indices of the prompts of its task with as many words that differ from it
    in 1 to `max_words` word positions (every prompt of the task when none does)."""
    words = [p.split() for p in prompts]
    out = []
    for i, w in enumerate(words):
        same_task = [j for j in range(len(prompts)) if tags[j] == tags[i] and j != i]
        near = [
            j
            for j in same_task
            if len(words[j]) == len(w) and 1 <= sum(a != b for a, b in zip(words[j], w)) <= max_words
        ]
        out.append(torch.tensor(near or same_task or [i]))
    return out


class MatchingBatches:
    """Seeded batches of world-caption matching pairs: a prompt, a rendering of its scene (preferred)
    and a rendering of another prompt's scene, half of the other prompts near misses of the prompt
    (`near_miss_prompts`); p = 0.5 where the other prompt happens to be the same one. With
    `counterfactual` > 0 that fraction of the other images is instead the prompt's own scene edited to
    fail it (`diffalign.world.counterfactual`; p = 1). With `degrade` > 0 every image is blurred and
    noised at random (`degrade_images`)."""

    def __init__(self, seed: int, image_size: int, degrade: float = 0.0, counterfactual: float = 0.0) -> None:
        from diffalign.world.dataset import ShapesGenerator

        self.world = ShapesGenerator()
        self.gen = torch.Generator().manual_seed(seed)
        self.size = image_size
        self.degrade = degrade
        self.counterfactual = counterfactual
        self.tags = [m["tag"] for m in self.world.metadata]
        self.near = near_miss_prompts([m["prompt"] for m in self.world.metadata], self.tags)

    def next(self, batch_size: int) -> tuple[Tensor, Tensor, list[str], Tensor]:
        """(preferred images, other images, prompts, prob_a), images float [B,3,S,S] in [0,1]."""
        world, gen, size = self.world, self.gen, self.size
        ids = world.sample_prompt_ids(batch_size, gen)
        other = world.sample_prompt_ids(batch_size, gen)
        near = torch.rand(batch_size, generator=gen) < 0.5
        for k in near.nonzero().flatten().tolist():
            pool = self.near[int(ids[k])]
            other[k] = pool[torch.randint(len(pool), (1,), generator=gen)]
        good_scenes = world.scenes_for(ids, gen)
        bad_scenes = world.scenes_for(other, gen)
        prob = 1 - 0.5 * (ids == other).float()
        if self.counterfactual > 0:
            # Drawn after the rest, so that counterfactual=0 keeps the batches of earlier versions.
            edit = (torch.rand(batch_size, generator=gen) < self.counterfactual).nonzero().flatten()
            if len(edit):
                edited = counterfactual_scenes(
                    good_scenes.select(edit), ids[edit], self.tags, world.template, world.config.layout, gen
                )
                bad_scenes.put(edit, edited)
                prob[edit] = 1.0
        good = F.interpolate(world.render(good_scenes), size=(size, size), mode="bilinear")
        bad = F.interpolate(world.render(bad_scenes), size=(size, size), mode="bilinear")
        prompts = [world.metadata[i]["prompt"] for i in ids.tolist()]
        if self.degrade > 0:
            good, bad = degrade_images(good, self.degrade, gen), degrade_images(bad, self.degrade, gen)
        return good, bad, prompts, prob


def degrade_images(images: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Blur each image [B, 3, H, W] in [0, 1] by a Gaussian of sigma ~ U[0, 1.5 strength] pixels (a
    7-tap separable kernel; sigma near 0 leaves it unchanged) and add noise of sigma ~ U[0, 0.1
    strength]; clamped to [0, 1]."""
    batch, channels = images.shape[:2]
    sigma = torch.rand(batch, generator=generator) * 1.5 * strength
    taps = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    flat = images.reshape(1, batch * channels, *images.shape[2:])
    flat = F.pad(flat, (3, 3, 3, 3), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=batch * channels)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=batch * channels)
    noise = torch.rand(batch, generator=generator) * 0.1 * strength
    noisy = flat.reshape(images.shape) + noise.view(-1, 1, 1, 1) * torch.randn(
        images.shape, generator=generator
    )
    return noisy.clamp(0, 1)


def matching_loss(model: LearnedReward, batch: tuple[Tensor, Tensor, list[str], Tensor]) -> Tensor:
    """The Bradley–Terry loss of `model` on one `MatchingBatches` batch."""
    good, bad, prompts, prob = batch
    r = model.forward(torch.cat([good, bad]).to(model.device), prompts + prompts)
    return bt_loss(r[: len(prompts)] - r[len(prompts) :], prob.to(model.device))


def pretrain_matching(
    model: LearnedReward,
    steps: int,
    config: RewardTrainConfig,
    device: torch.device,
    on_log: Callable[[dict], None] | None = None,
    log_every: int = 250,
) -> None:
    """World-caption pretraining: BT batches preferring the prompt's rendered scene to another prompt's
    scene (the warm-up of `config`, then a constant learning rate, or a cosine decay with
    `config.pretrain_cosine`; its own optimiser; seeded).

    Half of the other prompts are near misses of the prompt: prompts of the same GenEval task that
    differ from it in one or two words ("three circles" against "two circles", "a red circle left of a
    blue square" against "... right of ..." or "a blue circle left of a red square"). They teach counts,
    relations and attribute binding, which a random other prompt (usually different colours and shapes)
    rarely does: the pairs of a preference set show two images of the same prompt, which differ in
    exactly such details.

    `on_log`, when given, is called every `log_every` steps and after the last one with
    {"pretrain_step", "matching_loss" (the mean over the steps since the last call), "lr",
    "elapsed_s", "caption_matching_accuracy" (`caption_matching_accuracy` on 1,024 fresh pairs)}.
    The probe draws from its own generator, so logging does not change the weights trained.
    """
    model.to(device)
    batches = MatchingBatches(
        config.seed + 2, config.model.image_size, config.pretrain_degrade, config.pretrain_counterfactual
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    running, counted, start_time = 0.0, 0, time.time()
    for step in range(steps):
        if config.pretrain_cosine:
            factor = _lr_factor(step, steps, config)
        else:
            factor = min(1.0, (step + 1) / max(1, config.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor
        loss = matching_loss(model, batches.next(config.batch_size))
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(
                f"world-caption pretraining: the loss became {float(loss.detach())} at step {step}; "
                f"lower lr (now {config.lr})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        running, counted = running + float(loss.detach()), counted + 1
        if on_log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            on_log(
                {
                    "pretrain_step": step + 1,
                    "matching_loss": running / counted,
                    "lr": optimizer.param_groups[0]["lr"],
                    "elapsed_s": time.time() - start_time,
                    "caption_matching_accuracy": caption_matching_accuracy(model),
                }
            )
            running, counted = 0.0, 0


def describe_pretraining(record: dict) -> str:
    """One line for a `pretrain_matching` progress record (printed by the CLI and the benchmark)."""
    return (
        f"pretrain step {record['pretrain_step']:>5}  matching loss {record['matching_loss']:.4f}  "
        f"caption matching {record['caption_matching_accuracy']:.3f}"
    )


@torch.no_grad()
def caption_matching_accuracy(model: LearnedReward, pairs: int = 1024, seed: int = 12345) -> float:
    """The share of fresh world-caption matching pairs (`MatchingBatches`, clean renderings, half of the
    other prompts near misses) on which `model` scores the prompt's own rendering higher (equal scores
    count half); pairs whose other prompt is the prompt itself are left out. A probe of what
    pretraining has taught: a model that reads counts, relations and attribute binding approaches 1,
    chance is 0.5."""
    was_training = model.net.training
    model.eval()
    good, bad, prompts, prob = MatchingBatches(seed, model.config.image_size).next(pairs)
    device = model.device
    r_good = model.forward(good.to(device), prompts)
    r_bad = model.forward(bad.to(device), prompts)
    model.train(was_training)
    wins = ((r_good > r_bad).float() + 0.5 * (r_good == r_bad).float()).cpu()
    return float(wins[prob > 0.5].mean())


def initial_model(
    pairs: PreferencePairs,
    config: RewardTrainConfig,
    *,
    rater_conditioned: bool = False,
    name: str = "learned",
    on_log: Callable[[dict], None] | None = None,
) -> LearnedReward:
    """A new reward model for `pairs` (its vocabulary from their prompts; one reward per rater group
    seen in them with `rater_conditioned`), world-caption pretrained for `config.pretrain_steps`
    (`on_log` receives the pretraining's progress records, `pretrain_matching`)."""
    model_config = copy.deepcopy(config.model)
    if rater_conditioned:
        model_config.groups = sorted({g for g in pairs.groups if g is not None})
        if not model_config.groups:
            raise PreferenceDataError("rater_conditioned=True but no training pair names a rater group")
    else:
        model_config.groups = []
    device = resolve_device(config.device)
    model = build_reward_model(pairs.prompts, model_config, seed=config.seed, name=name).to(device)
    model.train()
    if config.pretrain_steps > 0:
        pretrain_matching(model, config.pretrain_steps, config, device, on_log=on_log)
    return model


def train_reward_model(
    pairs: PreferencePairs,
    config: RewardTrainConfig | None = None,
    *,
    rater_conditioned: bool = False,
    held_out: PreferencePairs | None = None,
    on_log: Callable[[dict], None] | None = None,
    name: str = "learned",
    initial: LearnedReward | None = None,
) -> TrainResult:
    """Train a reward model on `pairs` with the soft-label Bradley–Terry loss (see the module doc).

    Args:
        pairs: the labelled pairs (uint8 images); ties (prob_a = 0.5) are trained on as half/half.
        config: the training recipe and architecture.
        rater_conditioned: learn one reward per rater group (the groups seen in the training pairs)
            plus a pooled reward; pairs without a group train the pooled entry.
        held_out: explicit held-out pairs (otherwise `config.held_out_fraction` of `pairs`, seeded).
        on_log: called with each epoch's history record, and while `config.pretrain_steps` run,
            with the pretraining's progress records (`pretrain_matching`: they hold "pretrain_step"
            instead of "epoch").
        name: the reward's name.
        initial: start from a copy of this model (e.g. one pretrained once for all the members of an
            ensemble, `initial_model`) instead of building and pretraining a new one.

    Raises:
        PreferenceDataError: no pairs, or only ties.
        NonFiniteLossError: the loss became NaN or infinite (names the step).
    """
    config = config or RewardTrainConfig()
    check_trainable(pairs)
    device = resolve_device(config.device)
    if held_out is None and config.held_out_fraction > 0 and len(pairs) >= 2:
        train, held = pairs.split(config.held_out_fraction, seed=config.seed)
    else:
        train, held = pairs, held_out
    check_trainable(train, "pairs left for training after the held-out split")
    if held is not None and len(held) == 0:
        held = None

    if initial is None:
        model = initial_model(train, config, rater_conditioned=rater_conditioned, name=name, on_log=on_log)
    else:
        model = copy.deepcopy(initial).to(device)
        model.name = name
        model.train()

    gen = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # Frozen parameters get no gradient (requires_grad off), so AdamW leaves them (and their decay) alone.
    encoder = model.net.encoder_parameters()
    ema = WeightEMA(model.net, config.ema_decay) if config.ema_decay > 0 else None
    matching = None
    if config.matching_weight > 0:
        matching = MatchingBatches(
            config.seed + 3, model.config.image_size, config.pretrain_degrade, config.pretrain_counterfactual
        )
    n = len(train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)

    history: list[dict] = []
    best_loss, best_epoch, best_state, bad_epochs = math.inf, 0, None, 0
    stopped_early, step, start_time = False, 0, time.time()
    group_names = list(train.groups)
    for epoch in range(1, config.epochs + 1):
        for param in encoder:
            param.requires_grad_(epoch > config.freeze_encoder_epochs)
        perm = torch.randperm(n, generator=gen)
        running, seen = 0.0, 0
        for start in range(0, n, config.batch_size):
            if step >= total:
                break
            idx = perm[start : start + config.batch_size]
            pos = idx.tolist()
            a = to_float(train.images_a[idx], torch.device("cpu"))
            b = to_float(train.images_b[idx], torch.device("cpu"))
            p = train.prob_a[idx].clone()
            if config.swap_ab:
                swap = torch.rand(len(pos), generator=gen) < 0.5
                a, b = (
                    torch.where(swap[:, None, None, None], b, a),
                    torch.where(swap[:, None, None, None], a, b),
                )
                p = torch.where(swap, 1 - p, p)
            prompts = [train.prompts[i] for i in pos]
            if config.mirror_relations:
                flips = draw_mirrors(len(pos), gen)
                a, b = mirror_images(a, flips), mirror_images(b, flips)
                prompts = mirror_prompts(prompts, flips)
            a = shift_images(a, config.shift_pixels, gen)
            b = shift_images(b, config.shift_pixels, gen)
            gid = model.group_ids([group_names[i] for i in pos], len(pos))
            if gid is not None:
                drop = (torch.rand(len(pos), generator=gen) < config.group_dropout).to(device)
                gid = torch.where(drop, torch.zeros_like(gid), gid)
                gid = torch.cat([gid, gid])
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(step, total, config)
            r = model.forward(torch.cat([a, b]).to(device), prompts + prompts, gid)
            pref_loss = bt_loss(r[: len(pos)] - r[len(pos) :], p.to(device))
            loss = pref_loss
            if matching is not None:
                loss = loss + config.matching_weight * matching_loss(model, matching.next(config.batch_size))
            if not bool(torch.isfinite(loss)):
                raise NonFiniteLossError(
                    f"reward-model training: the loss became {float(loss.detach())} at step {step} "
                    f"(epoch {epoch}); lower lr (now {config.lr}) or check the images for NaN"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update()
            step += 1
            running += float(pref_loss.detach()) * len(pos)
            seen += len(pos)
        record: dict = {
            "epoch": epoch,
            "step": step,
            "train_loss": running / max(1, seen),
            "held_out_loss": None,
            "held_out_accuracy": None,
            "lr": optimizer.param_groups[0]["lr"],
            "elapsed_s": time.time() - start_time,
        }
        if held is not None:
            live = None
            if ema is not None:  # evaluate (and keep) the averaged weights
                live = copy.deepcopy(model.net.state_dict())
                model.net.load_state_dict(ema.state_dict())
            metrics = evaluate_pairs(model, held, config.eval_batch_size)
            if not math.isfinite(metrics["loss"]):
                # the weights the last step left score NaN or inf: nothing after this is usable
                raise NonFiniteLossError(
                    f"reward-model training: the held-out loss became {metrics['loss']} after epoch "
                    f"{epoch} (step {step}); lower lr (now {config.lr})"
                )
            record["held_out_loss"], record["held_out_accuracy"] = metrics["loss"], metrics["accuracy"]
            if metrics["loss"] < best_loss - 1e-6:
                best_loss, best_epoch, bad_epochs = metrics["loss"], epoch, 0
                best_state = copy.deepcopy(model.net.state_dict())
            else:
                bad_epochs += 1
            if live is not None:
                model.net.load_state_dict(live)
        else:
            best_epoch = epoch
        history.append(record)
        if on_log is not None:
            on_log(record)
        if step >= total:
            break
        if held is not None and config.patience > 0 and bad_epochs >= config.patience:
            stopped_early = True
            break
    for param in encoder:
        param.requires_grad_(True)
    if best_state is not None:
        model.net.load_state_dict(best_state)
    elif ema is not None:
        model.net.load_state_dict(ema.state_dict())
    model.eval()
    _check_finite_scores(model, train.select(range(min(len(train), config.eval_batch_size))), config)
    return TrainResult(model, history, best_epoch, stopped_early, train, held)


def _check_finite_scores(model: LearnedReward, pairs: PreferencePairs, config: RewardTrainConfig) -> None:
    """Refuse to return a model whose weights or scores are not finite (the step after the last
    finite loss can still overflow them, and without a held-out set nothing else would notice)."""
    broken = [name for name, value in model.net.state_dict().items() if not bool(torch.isfinite(value).all())]
    if not broken:
        ra, rb = score_pairs(model, pairs, batch_size=config.eval_batch_size)
        if bool(torch.isfinite(ra).all() and torch.isfinite(rb).all()):
            return
    what = f"weights {', '.join(broken[:3])}" if broken else "scores"
    raise NonFiniteLossError(
        f"reward-model training: the trained model's {what} are not finite (NaN or inf); "
        f"lower lr (now {config.lr})"
    )
