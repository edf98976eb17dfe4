"""Making pairs to label: sample a model, pair its images per prompt, and (active mode) keep the pairs
a reward-model ensemble disagrees on most.

Plain mode queues every pair of the N images of a prompt (N(N-1)/2 pairs), oldest first. Active mode
scores each candidate pair by the ensemble's disagreement (the variance over members of the Bradley-Terry
P(A > B) = sigmoid(r_A - r_B); `RewardEnsemble.disagreement`) and queues the `max_pairs` highest, highest
first: uncertainty sampling with a query-by-committee score (Seung et al. 1992; used for reward models
by Christiano et al. 2017, "Deep RL from human preferences", section 2.2.4), so scarce human labels go
where the reward models are least sure. One pass, not the full loop of retraining between batches.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffalign.collect.queue import PairTask
from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.rewards.ensemble import RewardEnsemble
from diffalign.world.render import to_uint8


@dataclass
class GenerateConfig:
    """How `add-tasks` makes pairs.

    Attributes:
        per_prompt: images sampled per prompt (N >= 2); each prompt gives N(N-1)/2 candidate pairs.
        seed: the first sampling seed; image i of prompt p uses seed + p * per_prompt + i.
        batch_size: images sampled at once.
        max_pairs: keep at most this many pairs (active mode: the most disputed; plain mode: the first).
            None keeps all.
        disagreement: 'variance' or 'vote' (see `RewardEnsemble.disagreement`).
    """

    per_prompt: int = 4
    seed: int = 0
    batch_size: int = 64
    max_pairs: int | None = None
    disagreement: str = "variance"

    def __post_init__(self) -> None:
        if self.per_prompt < 2:
            raise ValueError(f"--per-prompt must be at least 2 (a pair), got {self.per_prompt}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"--max-pairs must be at least 1, got {self.max_pairs}")
        if self.disagreement not in ("variance", "vote"):
            raise ValueError(f"--disagreement must be 'variance' or 'vote', got {self.disagreement!r}")


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one a line; blank lines and lines starting with # are ignored) or a
    JSONL file whose objects have a "prompt" field (GenEval's metadata schema)."""
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first prompt. Lines end
    # at \n (and \r\n) only: `splitlines` would also split at U+2028, U+0085 and other characters that
    # JSON writers leave unescaped inside strings.
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompts {path}: not UTF-8 text ({err})") from err
    except OSError as err:
        raise ValueError(f"--prompts {path}: {err}") from err
    prompts = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                record = json.loads(line)
                prompt = record["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                where = f"--prompts {path} line {number}"
                raise ValueError(f"{where}: no JSON object with a 'prompt' ({err})") from err
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"--prompts {path} line {number}: 'prompt' must be non-empty text")
            line = prompt.strip()
        if "\x00" in line:  # PostgreSQL's text cannot hold it; a NUL in a prompt is a damaged file
            raise ValueError(f"--prompts {path} line {number}: the prompt has a NUL character")
        prompts.append(line)
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in the file")
    return prompts


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (lossless, deterministic)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_images(
    model, prompts: Sequence[str], sampler: SamplerConfig, config: GenerateConfig
) -> list[np.ndarray]:
    """uint8 images [N, H, W, 3] per prompt (seeded: the same arguments give the same images)."""
    jobs = [(p, i) for p in range(len(prompts)) for i in range(config.per_prompt)]
    images: list[list[np.ndarray]] = [[] for _ in prompts]
    for start in range(0, len(jobs), config.batch_size):
        chunk = jobs[start : start + config.batch_size]
        with torch.no_grad():
            trajectory = sample(
                model,
                [prompts[p] for p, _ in chunk],
                config=sampler,
                seeds=[config.seed + p * config.per_prompt + i for p, i in chunk],
            )
        for (p, _), image in zip(chunk, to_uint8(trajectory.images)):
            images[p].append(image)
    return [np.stack(per_prompt) for per_prompt in images]


def candidate_pairs(prompts: Sequence[str], images: Sequence[np.ndarray]) -> list[tuple[str, int, int, int]]:
    """(prompt, prompt index, i, j) for every pair i < j of a prompt's images whose pixels differ."""
    pairs = []
    for p, (prompt, stack) in enumerate(zip(prompts, images)):
        for i, j in itertools.combinations(range(len(stack)), 2):
            if not np.array_equal(stack[i], stack[j]):
                pairs.append((prompt, p, i, j))
    return pairs


def score_disagreement(
    ensemble: RewardEnsemble,
    prompts: Sequence[str],
    images: Sequence[np.ndarray],
    pairs: Sequence[tuple[str, int, int, int]],
    method: str = "variance",
    batch_size: int = 256,
) -> list[float]:
    """The ensemble's disagreement on each candidate pair."""

    def as_float(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0

    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        a = as_float([images[p][i] for _, p, i, _ in chunk])
        b = as_float([images[p][j] for _, p, _, j in chunk])
        scores.extend(ensemble.disagreement(a, b, [prompt for prompt, *_ in chunk], method=method).tolist())
    return scores


def make_pair_tasks(
    model,
    model_name: str,
    prompts: Sequence[str],
    sampler: SamplerConfig,
    config: GenerateConfig,
    ensemble: RewardEnsemble | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> list[PairTask]:
    """Sample the model and return the pairs to queue (active mode when `ensemble` is given)."""
    images = sample_images(model, prompts, sampler, config)
    log(f"sampled {sum(len(s) for s in images)} images for {len(prompts)} prompts")
    pairs = candidate_pairs(prompts, images)
    if not pairs:
        raise ValueError("every image of every prompt came out identical: no pair to label")
    if ensemble is not None:
        scores = score_disagreement(ensemble, prompts, images, pairs, config.disagreement)
        order = sorted(range(len(pairs)), key=lambda k: -scores[k])
    else:
        scores = [0.0] * len(pairs)
        order = list(range(len(pairs)))
    keep = order[: config.max_pairs] if config.max_pairs else order
    log(f"{len(pairs)} candidate pairs, queueing {len(keep)}")
    tasks = []
    for k in keep:
        prompt, p, i, j = pairs[k]
        seeds = (config.seed + p * config.per_prompt + i, config.seed + p * config.per_prompt + j)
        tasks.append(
            PairTask(
                prompt=prompt,
                image_a=png_bytes(images[p][i]),
                image_b=png_bytes(images[p][j]),
                priority=scores[k],
                meta={"model": model_name, "seeds": list(seeds), "sampler": sampler.sampler},
                image_meta=({"model": model_name, "seed": seeds[0]}, {"model": model_name, "seed": seeds[1]}),
            )
        )
    return tasks
