"""Where online trainers (DDPO, GRPO, AlignProp, DRaFT, ReFL) get their training prompts.

`load_prompt_source(spec)` understands three specs:
- "world": the Shapes world's training prompt distribution (`diffalign.world.ShapesGenerator`: every
  GenEval task equally likely, every distinct prompt of a task equally likely);
- "shapeseval": the ShapesEval evaluation prompts, each line equally likely (training on the
  evaluation prompts measures optimisation, not generalisation: say so when reporting it);
- a path to a text file: one prompt a line (blank lines and lines starting with "#" skipped).

`PromptSource.sample(n, generator)` draws with replacement and is a function of the generator's state
only, so a trainer that seeds a generator per step (`runtime.step_generator`) draws the same prompts
after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PROMPT_SPECS = ("world", "shapeseval")


class PromptSourceError(ValueError):
    """A prompt spec that names no usable prompts (a missing or empty file)."""


@dataclass(frozen=True)
class PromptSource:
    """A finite set of prompts with sampling weights.

    Attributes:
        spec: what it was loaded from ("world", "shapeseval" or a file path).
        prompts: the distinct-or-repeated prompt texts.
        weights: [len(prompts)] float64 sampling probabilities (summing to 1).
    """

    spec: str
    prompts: tuple[str, ...]
    weights: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        """`n` prompts drawn with replacement; a function of the (CPU) generator's state only."""
        if n < 1:
            raise ValueError(f"PromptSource.sample: n must be >= 1, got {n}")
        ids = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return [self.prompts[i] for i in ids.tolist()]


def _uniform(spec: str, prompts: list[str]) -> PromptSource:
    weights = torch.full((len(prompts),), 1.0 / len(prompts), dtype=torch.float64)
    return PromptSource(spec, tuple(prompts), weights)


def _from_file(spec: str) -> PromptSource:
    path = Path(spec)
    if not path.is_file():
        raise PromptSourceError(
            f"prompt source {spec!r}: no such file (use 'world', 'shapeseval' or a text file, "
            "one prompt a line)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise PromptSourceError(f"prompt file {spec!r} holds no prompts (one prompt a line expected)")
    return _uniform(str(path), prompts)


def load_prompt_source(spec: str) -> PromptSource:
    """The prompt source named by `spec` ("world", "shapeseval" or a text file path; see module doc)."""
    if spec == "world":
        from diffalign.world import ShapesGenerator

        gen = ShapesGenerator()
        prompts = [meta["prompt"] for meta in gen.metadata]
        return PromptSource(
            "world", tuple(prompts), gen.prompt_probs.double() / gen.prompt_probs.double().sum()
        )
    if spec == "shapeseval":
        from diffalign.world import load_shapeseval

        return _uniform("shapeseval", [meta["prompt"] for meta in load_shapeseval()])
    return _from_file(spec)
