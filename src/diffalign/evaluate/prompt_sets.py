"""Prompt sets for evaluating real text-to-image models, read from local benchmark files (never downloaded).

Formats (their published layouts):
- PartiPrompts (Yu et al. 2022, `PartiPrompts.tsv` of google-research/parti): tab-separated with the
  header `Prompt  Category  Challenge  Note`; the category and challenge are kept.
- DrawBench (Saharia et al. 2022, the CSV export of its sheet): comma-separated with the header
  `Prompts,Category`.
- HPSv2 benchmark (Wu et al. 2023, `hpsv2`'s benchmark files): one JSON file per style
  (`anime.json`, `concept-art.json`, `paintings.json`, `photo.json`), each a JSON list of prompt
  strings; a folder holding them reads all four, the style being the category.
- GenEval (Ghosh et al. 2023, `evaluation_metadata.jsonl`; also what `diffalign shapeseval prompts`
  writes): JSON lines, each an object with a "prompt" string; its "tag" (the task) is the category.
- A plain text file: one prompt per line (blank lines skipped), no category.

`read_prompt_set(path)` picks the reader from the extension (or `kind`); malformed files raise
`PromptSetError` naming the file and the row.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from diffalign.jsonl import json_lines

HPSV2_STYLES: tuple[str, ...] = ("anime", "concept-art", "paintings", "photo")
KINDS: tuple[str, ...] = ("parti", "drawbench", "hpsv2", "geneval", "text")


class PromptSetError(ValueError):
    """A prompt file that cannot be read (the message names the file and, where known, the row)."""


@dataclass
class PromptSet:
    """Prompts with optional per-prompt categories.

    Attributes:
        name: the set's name ("parti", "drawbench", "hpsv2", "geneval", "text").
        prompts: the prompts in file order.
        categories: one category per prompt ("" when the format has none).
        extra: further per-prompt columns (PartiPrompts' "challenge"), each a list aligned with prompts.
    """

    name: str
    prompts: list[str]
    categories: list[str]
    extra: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def by_category(self) -> dict[str, list[str]]:
        """{category: prompts}, in first-appearance order."""
        out: dict[str, list[str]] = {}
        for prompt, category in zip(self.prompts, self.categories):
            out.setdefault(category, []).append(prompt)
        return out


def _read_table(path: Path, delimiter: str, prompt_col: str, other_cols: tuple[str, ...]) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PromptSetError(f"{path}: cannot read ({err})") from err
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        raise PromptSetError(f"{path}: empty file, expected a header with column {prompt_col!r}")
    header = [h.strip() for h in header]
    missing = [c for c in (prompt_col, *other_cols) if c not in header]
    if missing:
        raise PromptSetError(f"{path}: header {header} lacks column(s) {missing}")
    rows = []
    for number, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise PromptSetError(f"{path}, row {number}: {len(row)} fields, the header has {len(header)}")
        record = dict(zip(header, row))
        if not record[prompt_col].strip():
            raise PromptSetError(f"{path}, row {number}: empty {prompt_col!r}")
        rows.append(record)
    if not rows:
        raise PromptSetError(f"{path}: no prompts")
    return rows


def read_partiprompts(path: str | Path) -> PromptSet:
    """PartiPrompts TSV: columns Prompt, Category, Challenge (and Note)."""
    rows = _read_table(Path(path), "\t", "Prompt", ("Category", "Challenge"))
    return PromptSet(
        "parti",
        [r["Prompt"].strip() for r in rows],
        [r["Category"].strip() for r in rows],
        {"challenge": [r["Challenge"].strip() for r in rows]},
    )


def read_drawbench(path: str | Path) -> PromptSet:
    """DrawBench CSV: columns Prompts, Category."""
    rows = _read_table(Path(path), ",", "Prompts", ("Category",))
    return PromptSet("drawbench", [r["Prompts"].strip() for r in rows], [r["Category"].strip() for r in rows])


def _read_hpsv2_file(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PromptSetError(f"{path}: not a JSON file ({err})") from err
    if not isinstance(data, list) or not data:
        raise PromptSetError(f"{path}: expected a non-empty JSON list of prompt strings")
    for i, item in enumerate(data):
        if not isinstance(item, str) or not item.strip():
            raise PromptSetError(f"{path}, item {i}: expected a non-empty string, got {item!r}")
    return [item.strip() for item in data]


def read_hpsv2(path: str | Path) -> PromptSet:
    """An HPSv2 benchmark style file (`photo.json`, ...) or a folder of them (the four styles)."""
    path = Path(path)
    files = (
        [path]
        if path.is_file()
        else [path / f"{s}.json" for s in HPSV2_STYLES if (path / f"{s}.json").is_file()]
    )
    if not files:
        raise PromptSetError(
            f"{path}: no HPSv2 benchmark files ({', '.join(s + '.json' for s in HPSV2_STYLES)})"
        )
    prompts, categories = [], []
    for file in files:
        items = _read_hpsv2_file(file)
        prompts += items
        categories += [file.stem] * len(items)
    return PromptSet("hpsv2", prompts, categories)


def read_geneval_metadata(path: str | Path) -> PromptSet:
    """GenEval metadata JSON lines: one object per line with a "prompt" (its "tag" is the category)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PromptSetError(f"{path}: cannot read ({err})") from err
    prompts, tags = [], []
    for where, record in json_lines(lines, str(path), PromptSetError):
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptSetError(f"{where}: expected an object with a non-empty 'prompt' string")
        prompts.append(prompt.strip())
        tags.append(str(record.get("tag", "") or ""))
    if not prompts:
        raise PromptSetError(f"{path}: no prompts")
    return PromptSet("geneval", prompts, tags)


def read_text_prompts(path: str | Path) -> PromptSet:
    """One prompt per line; blank lines are skipped."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise PromptSetError(f"{path}: cannot read ({err})") from err
    prompts = [line for line in lines if line]
    if not prompts:
        raise PromptSetError(f"{path}: no prompts")
    return PromptSet("text", prompts, [""] * len(prompts))


def read_prompt_set(path: str | Path, kind: str | None = None) -> PromptSet:
    """Read a prompt set; `kind` is one of KINDS or None (from the extension: .tsv parti, .csv drawbench,
    .json or a folder hpsv2, .jsonl geneval, anything else text)."""
    path = Path(path)
    if not path.exists():
        raise PromptSetError(f"{path}: no such prompt file")
    if kind is None:
        suffix = path.suffix.lower()
        kind = {".tsv": "parti", ".csv": "drawbench", ".json": "hpsv2", ".jsonl": "geneval"}.get(
            suffix, "text"
        )
        kind = "hpsv2" if path.is_dir() else kind
    readers = {
        "parti": read_partiprompts,
        "drawbench": read_drawbench,
        "hpsv2": read_hpsv2,
        "geneval": read_geneval_metadata,
        "text": read_text_prompts,
    }
    if kind not in readers:
        raise PromptSetError(f"prompt set kind must be one of {KINDS}, got {kind!r}")
    return readers[kind](path)


def world_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts drawn from the Shapes world's prompt distribution (`ShapesGenerator`), seeded."""
    import torch

    from diffalign.world.dataset import ShapesGenerator

    if n < 1:
        raise ValueError(f"world_prompts needs n >= 1, got {n}")
    gen = ShapesGenerator()
    ids = gen.sample_prompt_ids(n, torch.Generator().manual_seed(seed))
    return [gen.metadata[i]["prompt"] for i in ids.tolist()]
