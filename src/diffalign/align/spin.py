"""Self-play fine-tuning of diffusion models (SPIN-Diffusion, Yuan et al. 2024, arXiv:2402.10210).

No reward model and no new labels: each round, the model generates an image for the prompt of every
real example, and Diffusion-DPO treats the real image as the winner and the model's own generation as
the loser, with the previous iterate as the reference. The policy is pushed to tell its own samples
from real data apart until it cannot: the fixed point is the data distribution.

Real examples come from a preference store (its winners: `real_from_pairs`, as the paper uses
Pick-a-Pic's winners) or from the Shapes world's renderer (`real_from_world`, ground-truth scenes).

What this leaves out: the paper's trajectory-level objective over the whole chain is approximated, as
in its practical algorithm, by Diffusion-DPO's single-timestep denoising loss (real and generated image
sharing noise and timestep); the paper's separate schedule of sampling steps is the sampler config here.
With several processes each generates its share of a round's images (image i on process i % N, with
the seed one process gives it), all processes gather them and train on every pair, data parallel or
sharded (`runtime.sharding=fsdp`; `diffalign.align.rounds`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffalign.align.config_io import to_dict
from diffalign.align.dpo import DPOConfig, PreferenceDataError, check_prompts
from diffalign.align.online_dpo import sampler_for
from diffalign.align.rounds import check_round_fields, gather_in_order, process_share, run_rounds
from diffalign.diffusion.sampling import sample
from diffalign.models.lora_merge import merged_for_sampling
from diffalign.prefs.pairs import PreferencePairs
from diffalign.prefs.simulate import SEED_STRIDE
from diffalign.prefs.stored_pairs import StoredPairs


@dataclass
class RealExamples:
    """Real (prompt, image) examples: the winners SPIN trains towards.

    Attributes:
        prompts: one prompt per image.
        images: uint8 [N, 3, H, W].
        source: where they came from, for the run record.
    """

    prompts: list[str]
    images: torch.Tensor
    source: str

    def __post_init__(self) -> None:
        if len(self.prompts) != self.images.shape[0]:
            raise ValueError(f"{len(self.prompts)} prompts but {self.images.shape[0]} images")
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, 3, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if not self.prompts:
            raise PreferenceDataError(f"{self.source}: no real examples to train on")


def real_from_pairs(
    pairs: PreferencePairs | StoredPairs, limit: int = 0, source: str = "store"
) -> RealExamples:
    """The preferred image of every non-tie pair (each distinct (prompt, image) once), first `limit`.
    With `StoredPairs` only the chosen images are read from the store."""
    stored = isinstance(pairs, StoredPairs)
    prompts, chosen = preferred_images(pairs, limit, source)
    images = pairs.column(chosen)[:] if stored else torch.stack(chosen)
    return RealExamples(prompts, images, source)


def preferred_images(
    pairs: PreferencePairs | StoredPairs, limit: int = 0, source: str = "store"
) -> tuple[list[str], list]:
    """(prompts, images) of the preferred image of every non-tie pair, each distinct (prompt, image)
    once, the first `limit` (0: all). The images are uint8 [3, H, W] tensors, or sha256 hashes for
    `StoredPairs` (nothing is read). PreferenceDataError when there are none."""
    stored = isinstance(pairs, StoredPairs)
    prompts, chosen, seen = [], [], set()
    for i in range(len(pairs)):
        prob = float(pairs.prob_a[i])
        if prob == 0.5:
            continue
        if stored:
            image = pairs.hashes_a[i] if prob > 0.5 else pairs.hashes_b[i]
            key = (pairs.prompts[i], image)
        else:
            image = pairs.images_a[i] if prob > 0.5 else pairs.images_b[i]
            key = (pairs.prompts[i], hash(image.numpy().tobytes()))
        if key in seen:
            continue
        seen.add(key)
        prompts.append(pairs.prompts[i])
        chosen.append(image)
        if limit and len(prompts) == limit:
            break
    if not prompts:
        raise PreferenceDataError(f"{source}: no preferred images (the pairs are empty or all ties)")
    return prompts, chosen


def real_from_world(n: int, size: int, seed: int = 0) -> RealExamples:
    """n rendered Shapes-world scenes with their prompts (ground truth, uniform over the world)."""
    from diffalign.world.dataset import DatasetConfig, ShapesGenerator

    batch = ShapesGenerator(DatasetConfig(canvas_size=size)).sample(n, torch.Generator().manual_seed(seed))
    images = (batch.images.clamp(0, 1) * 255).round().to(torch.uint8)
    return RealExamples(list(batch.prompts), images, f"world:{n}:{seed}")


@dataclass
class SPINConfig:
    """A SPIN-Diffusion run.

    Attributes:
        dpo: the Diffusion-DPO config of every round (`dpo.model` is the starting model, `dpo.steps`
            the steps of each round; `dpo.beta` the DPO beta).
        rounds: self-play iterations (the paper runs 3).
        reference_every: refresh the reference every this many rounds (1, the paper's: the previous
            iterate; 0: the starting model throughout).
        sample_steps: sampler steps for the model's own images (0: the family's default sampler's).
        guidance: guidance scale for them (None: the default sampler's).
        sample_batch: images per sampling call.
    """

    dpo: DPOConfig = field(default_factory=DPOConfig)
    rounds: int = 3
    reference_every: int = 1
    sample_steps: int = 0
    guidance: float | None = None
    sample_batch: int = 64

    def __post_init__(self) -> None:
        self.dpo = check_round_fields(self)


def generate(model, prompts: list[str], seeds: list[int], config: SPINConfig) -> torch.Tensor:
    """uint8 samples of `model`, image i with seed seeds[i] (LoRA adapters merged while sampling:
    `lora_merge`)."""
    sampler = sampler_for(model, config.sample_steps, config.guidance)
    out = [torch.empty((0, *model.image_shape), dtype=torch.uint8)]  # a process's share may be empty
    for start in range(0, len(prompts), config.sample_batch):
        chunk = slice(start, start + config.sample_batch)
        with torch.no_grad(), merged_for_sampling(model):
            traj = sample(model, prompts[chunk], config=sampler, seeds=seeds[chunk])
        out.append((traj.images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def train_spin(
    config: SPINConfig,
    real: RealExamples,
    run_dir: str | Path,
    *,
    resume: bool = False,
    show_progress: bool = False,
    on_round: Callable[[dict], None] | None = None,
):
    """Run SPIN-Diffusion (module doc) on `real` into `run_dir` (layout: `diffalign.align.rounds`)."""
    record = {
        "trainer": "spin",
        "config": to_dict(config),
        "real": {"source": real.source, "examples": len(real.prompts)},
    }
    seed = config.dpo.runtime.seed

    def make_pairs(index: int, model, accelerator) -> tuple[PreferencePairs, dict]:
        if tuple(real.images.shape[1:]) != tuple(model.image_shape):
            raise PreferenceDataError(
                f"the real images are {tuple(real.images.shape[1:])} but the model works on "
                f"{tuple(model.image_shape)}"
            )
        check_prompts(model, real.prompts, name=config.dpo.model, source=f"real examples from {real.source}")
        base = (1000 * seed + index) * SEED_STRIDE
        rank, processes = process_share(accelerator)
        mine = range(rank, len(real.prompts), processes)
        own = generate(model, [real.prompts[i] for i in mine], [base + i for i in mine], config)
        own = gather_in_order(accelerator, len(real.prompts), own)
        pairs = PreferencePairs(
            list(real.prompts),
            real.images,
            own,
            torch.ones(len(real.prompts)),
            keys=[f"spin:{index}:{i}" for i in range(len(real.prompts))],
        )
        return pairs, {"real": real.source, "examples": len(real.prompts)}

    return run_rounds(
        config.dpo,
        config.rounds,
        config.reference_every,
        Path(run_dir),
        make_pairs,
        record,
        resume=resume,
        show_progress=show_progress,
        on_round=on_round,
    )
