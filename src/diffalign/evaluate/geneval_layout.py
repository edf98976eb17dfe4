"""GenEval's folder layout: writing generated images into it and scoring a folder laid out so.

Layout (GenEval's `generation/diffusers_generate.py`)::

    DIR/00000/metadata.jsonl      the prompt's metadata line
    DIR/00000/samples/0000.png    its samples (also .jpg, .jpeg or .webp)
    DIR/00001/...

`score_folder` reads such a folder (from diffalign or any other generator), scores every image with
the Shapes-world detector and GenEval's rules, and reports per-image verdicts, per-task accuracy and
the overall score (mean of task accuracies) with bootstrap 95% intervals.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffalign.evaluate.failure_modes import failure_modes
from diffalign.evaluate.stats import bootstrap_mean_ci, stratified_bootstrap_ci
from diffalign.world.detector import DetectorConfig, load_image
from diffalign.world.geneval import score_image
from diffalign.world.grammar import GrammarError, validate_metadata
from diffalign.world.palette import CATEGORIES, DEFAULT_CANVAS_SIZE

_PROMPT_DIR = re.compile(r"\d+")
#: GenEval writes `samples/NNNN.png`; other generators write JPEG or WebP, read the same way.
_SAMPLE = re.compile(r"\d+\.(png|jpe?g|webp)", re.IGNORECASE)


class LayoutError(ValueError):
    """A GenEval-layout folder that cannot be scored (the message names the path)."""


def write_prompt_folder(
    root: str | Path, index: int, metadata: dict, images: Sequence[np.ndarray | Image.Image]
) -> Path:
    """Write one prompt's metadata and samples (uint8 HWC arrays or PIL images) in GenEval's layout."""
    folder = Path(root) / f"{index:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n", encoding="utf-8")
    for j, image in enumerate(images):
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        pil.save(folder / "samples" / f"{j:04d}.png")
    return folder


@dataclass
class FolderEntry:
    index: int
    metadata: dict
    images: list[Path]


def read_folder(root: str | Path) -> list[FolderEntry]:
    """List the prompts and samples of a GenEval-layout folder, validating every metadata file."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: not a folder")
    entries = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and _PROMPT_DIR.fullmatch(p.name)):
        meta_path = sub / "metadata.jsonl"
        if not meta_path.is_file():
            raise LayoutError(f"{meta_path}: missing (every prompt folder needs its metadata line)")
        try:
            text = meta_path.read_text(encoding="utf-8")
            lines = [line for line in text.splitlines() if line.strip()]
            if len(lines) != 1:
                raise LayoutError(f"{meta_path}: expected exactly one JSON line, found {len(lines)}")
            meta = validate_metadata(json.loads(lines[0]), str(meta_path))
        except json.JSONDecodeError as err:
            raise LayoutError(f"{meta_path}: not valid JSON ({err.msg})") from None
        except (GrammarError, UnicodeDecodeError) as err:
            raise LayoutError(str(err) if isinstance(err, GrammarError) else f"{meta_path}: {err}") from None
        samples = sub / "samples"
        images = sorted(p for p in samples.iterdir() if _SAMPLE.fullmatch(p.name)) if samples.is_dir() else []
        entries.append(FolderEntry(int(sub.name), meta, images))
    if not entries:
        raise LayoutError(
            f"{root}: no prompt folders (expected DIR/00000/metadata.jsonl and DIR/00000/samples/0000.png)"
        )
    if not any(e.images for e in entries):
        raise LayoutError(
            f"{root}: no images found under */samples/ (NNNN.png, .jpg, .jpeg or .webp); nothing to score"
        )
    return entries


def score_folder(
    root: str | Path,
    size: int | None = DEFAULT_CANVAS_SIZE,
    detector: DetectorConfig | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Score every image of a GenEval-layout folder (see module doc).

    Args:
        size: images of another size are resized to size x size (box filter); None keeps them as they are.
    Returns:
        {"overall": {"score", "ci95"}, "categories": {tag: {"accuracy", "ci95", "correct", "images"}},
         "failure_modes": {tag: {"images", "failed", "modes": {mode: share}}} (`failure_modes`),
         "images": [per-image verdicts], "n_images", "n_prompts"}.
    """
    root = Path(root)
    entries = read_folder(root)
    per_image: list[dict[str, Any]] = []
    by_tag: dict[str, list[float]] = {}
    for entry in entries:
        for path in entry.images:
            image = load_image(path, size)  # raises ValueError naming the file
            verdict = score_image(image, entry.metadata, detector)
            record = {
                "file": str(path.relative_to(root)),
                "index": entry.index,
                "tag": entry.metadata["tag"],
                "prompt": entry.metadata.get("prompt", ""),
                **verdict.to_dict(),
            }
            per_image.append(record)
            by_tag.setdefault(entry.metadata["tag"], []).append(float(verdict.correct))
    categories = {}
    for tag in [t for t in CATEGORIES if t in by_tag]:
        values = by_tag[tag]
        categories[tag] = {
            "accuracy": float(np.mean(values)),
            "ci95": list(bootstrap_mean_ci(values, n_boot=n_boot, seed=seed)),
            "correct": int(sum(values)),
            "images": len(values),
        }
    overall = float(np.mean([c["accuracy"] for c in categories.values()]))
    return {
        "overall": {
            "score": overall,
            "ci95": list(stratified_bootstrap_ci(by_tag, n_boot=n_boot, seed=seed)),
        },
        "categories": categories,
        "failure_modes": failure_modes(per_image),
        "n_images": len(per_image),
        "n_prompts": len(entries),
        "images": per_image,
    }
