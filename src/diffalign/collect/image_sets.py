"""Pairs to label from images that already exist: any generator's output, not only a diffalign model.

Two layouts are read (`read_image_sets`):

* a **GenEval-layout folder**, as GenEval's generation scripts and `diffalign eval` write it::

      DIR/00000/metadata.jsonl     one JSON object with a "prompt" (any text: the prompt need not be
                                   a Shapes-world prompt)
      DIR/00000/samples/0000.png   its images (.png, .jpg, .jpeg or .webp)

* a **JSONL manifest**, one image set a line, paths relative to the manifest's folder::

      {"prompt": "a cat in a hat", "images": ["out/cat_0.jpg", "out/cat_1.jpg", "out/cat_2.jpg"]}

Every pair of a prompt's images is a candidate (N(N-1)/2 pairs; byte-identical files are skipped), kept
in the order read, or in active mode ranked by a reward-model ensemble's disagreement as `add-tasks`
ranks sampled pairs (`diffalign.collect.tasks`). The files are queued as they are, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffalign.collect.queue import PairTask
from diffalign.images import displayed_rgb
from diffalign.jsonl import json_lines
from diffalign.prefs.records import prompt_text
from diffalign.rewards.ensemble import RewardEnsemble

_PROMPT_DIR = re.compile(r"\d+")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class ImageSet:
    """A prompt and the files of its images (two or more).

    Attributes:
        prompt: the prompt the images were made for.
        paths: the image files.
        where: where the set was read ("DIR/00003" or "manifest.jsonl line 4"), for errors.
    """

    prompt: str
    paths: list[Path]
    where: str


def read_image_sets(source: str | Path) -> list[ImageSet]:
    """The image sets of a GenEval-layout folder or a JSONL manifest (module doc). Raises ValueError
    naming the folder, file or line that cannot be read; sets with fewer than two images are skipped."""
    source = Path(source)
    if source.is_dir():
        sets = _folder_sets(source)
    elif source.is_file():
        sets = _manifest_sets(source)
    else:
        raise ValueError(f"{source}: no such folder or file")
    usable = [s for s in sets if len(s.paths) >= 2]
    if not usable:
        raise ValueError(f"{source}: no prompt with two or more images (nothing to compare)")
    return usable


def _folder_sets(root: Path) -> list[ImageSet]:
    sets = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and _PROMPT_DIR.fullmatch(p.name)):
        meta_path = sub / "metadata.jsonl"
        try:
            lines = [line for line in meta_path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]
            if len(lines) != 1:
                raise ValueError(f"expected one JSON line, found {len(lines)}")
            record = json.loads(lines[0])
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{meta_path}: {err}") from err
        samples = sub / "samples"
        paths = (
            sorted(p for p in samples.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
            if samples.is_dir()
            else []
        )
        sets.append(ImageSet(prompt_text(record.get("prompt"), str(meta_path)), paths, str(sub)))
    if not sets:
        raise ValueError(
            f"{root}: no prompt folders (expected DIR/00000/metadata.jsonl and DIR/00000/samples/)"
        )
    return sets


def _manifest_sets(path: Path) -> list[ImageSet]:
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: {err}") from err
    sets = []
    for where, record in json_lines(lines, str(path)):
        if not isinstance(record, dict) or not isinstance(record.get("images"), list):
            raise ValueError(f"{where}: expected an object with 'prompt' and a list 'images'")
        paths = []
        for k, item in enumerate(record["images"]):
            if not isinstance(item, str) or not item:
                raise ValueError(f"{where}: images[{k}] must be a file path, got {item!r}")
            file = (path.parent / item).expanduser()
            if not file.is_file():
                raise ValueError(f"{where}: images[{k}] {file} is not a file")
            paths.append(file)
        sets.append(ImageSet(prompt_text(record.get("prompt"), where), paths, where))
    return sets


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: {err.strerror or err}") from err


def _decoded(data: bytes, path: Path) -> Image.Image:
    """The file as a viewer shows it; a file that does not decode is named (before anything is queued)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # every pixel: a truncated file fails here, not in the store
            return displayed_rgb(im)
    except Exception as err:  # PIL raises many types for damaged files
        raise ValueError(f"{path}: not an image PIL can read ({err})") from err


def _pixels(image: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size, 3] (for the ensemble's scores only)."""
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def image_set_pair_tasks(
    sets: list[ImageSet],
    max_pairs: int | None = None,
    ensemble: RewardEnsemble | None = None,
    disagreement: str = "variance",
    log: Callable[[str], None] = lambda _: None,
) -> list[PairTask]:
    """The pairs to queue from `sets`: every pair of a set's byte-distinct files, the first `max_pairs`
    in reading order, or with `ensemble` the `max_pairs` it disagrees on most, most disputed first."""
    from diffalign.collect.tasks import score_disagreement

    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"--max-pairs must be at least 1, got {max_pairs}")
    if disagreement not in ("variance", "vote"):
        raise ValueError(f"--disagreement must be 'variance' or 'vote', got {disagreement!r}")
    data = [[_read_bytes(p) for p in image_set.paths] for image_set in sets]
    decoded = [[_decoded(b, p) for b, p in zip(files, st.paths)] for files, st in zip(data, sets)]
    candidates = []  # (set index, i, j)
    for n, files in enumerate(data):
        digests = [hashlib.sha256(b).digest() for b in files]
        for i, j in itertools.combinations(range(len(files)), 2):
            if digests[i] != digests[j]:
                candidates.append((n, i, j))
    if not candidates:
        raise ValueError("every prompt's images are copies of one file: no pair to label")
    scores = [0.0] * len(candidates)
    if ensemble is not None:
        size = ensemble.members[0].config.image_size
        pixels = [np.stack([_pixels(image, size) for image in images]) for images in decoded]
        prompts = [image_set.prompt for image_set in sets]
        as_pairs = [(prompts[n], n, i, j) for n, i, j in candidates]
        scores = score_disagreement(ensemble, prompts, pixels, as_pairs, disagreement)
        order = sorted(range(len(candidates)), key=lambda k: -scores[k])
    else:
        order = list(range(len(candidates)))
    keep = order[:max_pairs] if max_pairs else order
    images = sum(len(image_set.paths) for image_set in sets)
    log(f"{images} images of {len(sets)} prompts: {len(candidates)} candidate pairs, queueing {len(keep)}")
    tasks = []
    for k in keep:
        n, i, j = candidates[k]
        image_set = sets[n]
        tasks.append(
            PairTask(
                prompt=image_set.prompt,
                image_a=data[n][i],
                image_b=data[n][j],
                priority=float(scores[k]),
                meta={"source": image_set.where},
                image_meta=({"path": str(image_set.paths[i])}, {"path": str(image_set.paths[j])}),
            )
        )
    return tasks


__all__ = ["ImageSet", "image_set_pair_tasks", "read_image_sets"]
