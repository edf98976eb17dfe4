"""Unpaired feedback: single images marked liked or disliked, for Diffusion-KTO.

Diffusion-KTO (Li et al. 2024, arXiv:2404.04465) learns from per-image binary feedback, the kind a
product collects with a thumbs-up button, where no two images were ever compared. `read_ratings` reads
such feedback from a file, one rated image a record, image paths relative to the file's folder:

* JSON Lines (`.jsonl`)::

      {"prompt": "a cat in a hat", "image": "out/cat_0.png", "liked": true}

* CSV (`.csv`) with a header holding the columns `prompt`, `image` and `liked`.

`liked` is true or false; 1 and 0 (1.0 and 0.0 too), and the words `yes`/`no`, `like`/`dislike` and
`up`/`down` (any case), are read the same. Every image is read as a viewer shows it
(`diffalign.images.displayed_rgb`) and brought to the model's size as the preference store's images are
(`fit_square`). The whole file is checked before anything trains: a record that cannot be used is an
error naming the file and line (CSV: the line of the record's first field). The ratings are held in
memory as uint8 images (there is no streaming form, as there is for a store's pairs); the preference
store holds comparisons, and its pairs become KTO's likes and dislikes the paper's way
(`ImageRatings.from_pairs`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffalign.images import displayed_rgb, fit_square
from diffalign.jsonl import json_lines
from diffalign.prefs.pairs import PreferencePairs
from diffalign.prefs.records import prompt_text

COLUMNS = ("prompt", "image", "liked")
_TRUE = {"true", "1", "yes", "like", "liked", "up"}
_FALSE = {"false", "0", "no", "dislike", "disliked", "down"}


class RatingsError(ValueError):
    """A ratings file that cannot be used, naming the file and the line."""


@dataclass
class ImageRatings:
    """N images, each with the prompt it was made for and whether it was liked.

    Attributes:
        prompts: the prompt of each image.
        images: uint8 [N, 3, H, W].
        liked: [N] bool, True for a liked (desirable) image.
        where: where each rating was read ("ratings.jsonl line 4"), for errors; "" when unknown.
    """

    prompts: list[str]
    images: Tensor
    liked: Tensor
    where: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if not self.where:
            self.where = [""] * n
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"ImageRatings: images must be uint8 [N, 3, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        for label, count in (
            ("images", self.images.shape[0]),
            ("liked", self.liked.shape[0]),
            ("where", len(self.where)),
        ):
            if count != n:
                raise ValueError(f"ImageRatings: {n} prompts but {count} {label}")
        self.liked = self.liked.to(torch.bool)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def counts(self) -> tuple[int, int]:
        """(liked, disliked)."""
        liked = int(self.liked.sum())
        return liked, len(self) - liked

    @classmethod
    def from_pairs(cls, pairs: PreferencePairs) -> ImageRatings:
        """The winners of the non-tie pairs as liked and their losers as disliked: how Diffusion-KTO
        trains on pairwise data (and what `diffalign align kto --store` does)."""
        kept = pairs.without_ties()
        a_wins = (kept.prob_a > 0.5)[:, None, None, None]
        winners = torch.where(a_wins, kept.images_a, kept.images_b)
        losers = torch.where(a_wins, kept.images_b, kept.images_a)
        n = len(kept)
        return cls(
            kept.prompts + kept.prompts,
            torch.cat([winners, losers]).to(torch.uint8),
            torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)]),
            [f"comparison {k}" if k else "" for k in kept.keys] * 2,
        )

    @classmethod
    def concat(cls, parts: list[ImageRatings]) -> ImageRatings:
        """The ratings of every part, in order (images of one size)."""
        sizes = {tuple(part.images.shape[1:]) for part in parts}
        if len(sizes) > 1:
            raise ValueError(f"ImageRatings.concat: images of different sizes {sorted(sizes)}")
        return cls(
            [p for part in parts for p in part.prompts],
            torch.cat([part.images for part in parts]),
            torch.cat([part.liked for part in parts]),
            [w for part in parts for w in part.where],
        )

    def fingerprint(self) -> str:
        """sha256 of the prompts, pixels and labels (a resumed run refuses other ratings)."""
        digest = hashlib.sha256(b"ratings\n")
        digest.update("\n".join(self.prompts).encode())
        digest.update(self.images.contiguous().numpy().tobytes())
        digest.update(self.liked.numpy().tobytes())
        return digest.hexdigest()


def read_ratings(path: str | Path, size: int) -> ImageRatings:
    """The ratings in a JSONL or CSV file (module doc), every image brought to size x size.

    Raises:
        RatingsError: a missing or unreadable file, a record without a usable prompt, image or label,
            an image that cannot be read, or a file with no ratings; named by file and line.
    """
    path = Path(path).expanduser()
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not path.is_file():
        raise RatingsError(f"{path}: no such ratings file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise RatingsError(f"{path}: a ratings file is .jsonl or .csv, got {path.suffix or 'no suffix'!r}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise RatingsError(f"{path}: {err}") from err
    records = _jsonl_records(text, path) if suffix == ".jsonl" else _csv_records(text, path)
    prompts, images, liked, where = [], [], [], []
    for place, record in records:  # the cheap fields first, the image last
        prompts.append(prompt_text(record.get("prompt"), place, RatingsError))
        liked.append(_liked(record.get("liked"), place))
        images.append(_image(record.get("image"), path.parent, size, place))
        where.append(place)
    if not prompts:
        raise RatingsError(f"{path}: no ratings (expected records with {', '.join(COLUMNS)})")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageRatings(prompts, stacked, torch.tensor(liked, dtype=torch.bool), where)


def _jsonl_records(text: str, path: Path) -> Iterator[tuple[str, dict]]:
    for place, record in json_lines(text.split("\n"), str(path), RatingsError):
        if not isinstance(record, dict):
            raise RatingsError(f"{place}: expected an object with {', '.join(COLUMNS)}")
        yield place, record


def _csv_records(text: str, path: Path) -> Iterator[tuple[str, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    start = 1  # the line a record's first field is on: the line after the previous record ended
    try:
        for row in reader:
            place, start = f"{path} line {start}", reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                missing = [c for c in COLUMNS if c not in header]
                if missing:
                    raise RatingsError(f"{place}: the header lacks the column(s) {missing}; it has {header}")
                continue
            if len(row) != len(header):
                raise RatingsError(f"{place}: {len(row)} fields, the header has {len(header)}")
            yield place, dict(zip(header, row, strict=True))
    except csv.Error as err:
        raise RatingsError(f"{path} line {reader.line_num}: {err}") from err


def _liked(value: object, place: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE | _FALSE:
            return word in _TRUE
        with contextlib.suppress(ValueError):  # "1.0" as a spreadsheet writes it
            value = float(word)
    if isinstance(value, int | float) and value in (0, 1):  # 1 and 1.0 alike
        return bool(value)
    raise RatingsError(f"{place}: 'liked' must be true or false (or 1/0), got {value!r}")


def _image(value: object, folder: Path, size: int, place: str) -> np.ndarray:
    if not isinstance(value, str) or not value.strip():
        raise RatingsError(f"{place}: 'image' must be a file path, got {value!r}")
    file = (folder / value.strip()).expanduser()
    if not file.is_file():
        raise RatingsError(f"{place}: image {file} is not a file")
    try:
        with Image.open(file) as im:
            im.load()  # every pixel: a truncated file fails here, not while training
            rgb = displayed_rgb(im)
    except Exception as err:  # PIL raises many types for damaged or oversized files
        raise RatingsError(f"{place}: image {file} is not an image PIL can read ({err})") from err
    return np.asarray(fit_square(rgb, size), dtype=np.uint8).copy()
