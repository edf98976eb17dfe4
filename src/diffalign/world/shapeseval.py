"""ShapesEval: the fixed evaluation set of the Shapes world, in GenEval's metadata schema.

GenEval has 553 prompts spread over its six tasks (80 to 100 each). The Shapes world has only three
shapes, so some tasks have few distinct prompts (3 single-object prompts, 6 two-object prompts); to
give every task about the same weight of images, as GenEval does, those prompts are repeated (each
repetition is its own prompt index and gets its own samples), and colour attribution, which has 180
distinct prompts, is subsampled. The set is built by `build_shapeseval` with a fixed seed and shipped
as `data/shapeseval.jsonl`; a test checks that the shipped file equals a fresh build.

| task          | distinct prompts | lines |
|---------------|------------------|-------|
| single_object | 3                | 48    |
| two_object    | 6                | 48    |
| counting      | 9                | 54    |
| colors        | 18               | 54    |
| position      | 24               | 48    |
| color_attr    | 180              | 48    |
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

from diffalign.world.grammar import GrammarError, Metadata, all_metadata, read_metadata_jsonl

#: Lines per task: (number of lines, sample without replacement instead of cycling).
LINES_PER_TASK: dict[str, int] = {
    "single_object": 48,
    "two_object": 48,
    "counting": 54,
    "colors": 54,
    "position": 48,
    "color_attr": 48,
}
SEED = 43  # GenEval's default prompt-generation seed


def build_shapeseval(seed: int = SEED) -> list[Metadata]:
    """Build the evaluation set: each task's distinct prompts cycled, or sampled if there are more."""
    rng = random.Random(seed)
    lines: list[Metadata] = []
    for tag, n in LINES_PER_TASK.items():
        prompts = all_metadata(tag)
        if len(prompts) >= n:
            lines += rng.sample(prompts, n)
        else:
            order = list(range(len(prompts)))
            rng.shuffle(order)
            lines += [prompts[order[i % len(prompts)]] for i in range(n)]
    return lines


def to_jsonl(lines: list[Metadata]) -> str:
    return "".join(json.dumps(meta) + "\n" for meta in lines)


def shipped_path() -> Path:
    return Path(str(resources.files("diffalign.world") / "data" / "shapeseval.jsonl"))


def load_shapeseval(path: str | Path | None = None) -> list[Metadata]:
    """The shipped ShapesEval set (or a metadata JSONL at `path`), validated."""
    path = Path(path) if path is not None else shipped_path()
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise GrammarError(f"{path} line {line}: not UTF-8 text ({err.reason})") from None
    return read_metadata_jsonl(text.split("\n"), source=str(path))  # CRLF: "\r" is JSON whitespace
