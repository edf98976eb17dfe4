"""Labelled pairs whose images stay in the store until a batch needs them.

`PreferenceStore.pairs()` decodes every image into one uint8 tensor: right for the Shapes world and
for a few thousand pairs, impossible for a Pick-a-Pic-sized set (about a million pairs of 512-pixel
images, over a terabyte as uint8). `PreferenceStore.pair_references()` returns `StoredPairs` instead:
the prompts, labels and the images' sha256 hashes (a few hundred bytes per pair), and `StoredImages`
columns that read and decode only the images a batch indexes. The trainers index an image column
exactly as they index a uint8 [N, 3, S, S] tensor, so Diffusion-DPO and KTO train on either
(`diffalign align dpo --stream`).

Images are content-addressed, so the hashes are a fingerprint of the pixels: a resumed run recognises
the same data without reading it.

Prefetching. A trainer that knows its next batch (Diffusion-DPO draws each step's examples as a
function of the seed and the step) calls `prefetch(indices)` on a column; `read_workers` threads then
read and decode those images while the current step computes, and indexing takes them from there. File
reads, hashing and image decoding release the GIL, so the threads run beside the training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from diffalign.prefs.pairs import PreferencePairs


class ImageReader(Protocol):
    """What a column needs from the store: one image as uint8 [S, S, 3], resized to size x size."""

    def load_image(self, sha256: str, size: int | None = None) -> np.ndarray: ...


class StoredImages:
    """A column of N stored images that reads only what it is indexed with.

    Indexing with an int, a slice, a list or a 1-D integer tensor returns uint8 [n, 3, S, S] (an int
    gives [3, S, S]), as indexing the in-memory tensor would. `shape` is (N, 3, S, S). With
    `read_workers` > 0, `prefetch(indices)` reads those rows in background threads (module doc).
    """

    def __init__(self, reader: ImageReader, hashes: Sequence[str], size: int, read_workers: int = 0) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if read_workers < 0:
            raise ValueError(f"read_workers must be >= 0, got {read_workers}")
        self.reader = reader
        self.hashes = list(hashes)
        self.size = int(size)
        self.read_workers = int(read_workers)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.hashes), 3, self.size, self.size)

    def __len__(self) -> int:
        return len(self.hashes)

    def _read(self, sha256: str) -> Tensor:
        return torch.from_numpy(self.reader.load_image(sha256, self.size)).permute(2, 0, 1)

    def _row(self, position: int) -> Tensor:
        """Row `position`: the prefetched read when there is one (its error, if it failed, raised here)."""
        pending = self._pending.pop(position, None)
        return pending.result() if pending is not None else self._read(self.hashes[position])

    def _positions(self, index: slice | Sequence[int] | Tensor) -> list[int]:
        if isinstance(index, slice):
            return list(range(*index.indices(len(self.hashes))))
        return torch.as_tensor(index, dtype=torch.long).flatten().tolist()

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> Tensor:
        if isinstance(index, int):
            return self._row(index).contiguous()
        positions = self._positions(index)
        if not positions:
            return torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        return torch.stack([self._row(i) for i in positions]).contiguous()

    def prefetch(self, index: Sequence[int] | Tensor) -> None:
        """Start reading these rows in the background (nothing without read workers)."""
        if self.read_workers == 0:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.read_workers, thread_name_prefix="stored-images")
        for position in self._positions(index):
            if position not in self._pending:
                self._pending[position] = self._pool.submit(self._read, self.hashes[position])

    def close(self) -> None:
        """Stop the read workers, dropping reads nobody took."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()


@dataclass
class StoredPairs:
    """N labelled pairs of stored images, the images read on demand (module doc).

    Attributes:
        reader: the store the images are read from.
        size: the side the images are resized to.
        read_workers: background threads of each image column, for `prefetch` (0: none).
        prompts: [N] prompts.
        hashes_a, hashes_b: [N] sha256 of images A and B.
        prob_a: float32 [N], P(A preferred): 1.0, 0.0 or 0.5 (a tie).
        raters, groups, keys: per pair, as in `PreferencePairs`.
    """

    reader: ImageReader
    size: int
    prompts: list[str]
    hashes_a: list[str]
    hashes_b: list[str]
    prob_a: Tensor
    raters: list[str | None] = field(default_factory=list)
    groups: list[str | None] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    read_workers: int = 0

    def __post_init__(self) -> None:
        if self.read_workers < 0:
            raise ValueError(f"read_workers must be >= 0, got {self.read_workers}")
        n = len(self.prompts)
        self.raters = self.raters or [None] * n
        self.groups = self.groups or [None] * n
        self.keys = self.keys or [""] * n
        lengths = {
            "hashes_a": len(self.hashes_a),
            "hashes_b": len(self.hashes_b),
            "prob_a": int(self.prob_a.shape[0]),
            "raters": len(self.raters),
            "groups": len(self.groups),
            "keys": len(self.keys),
        }
        for label, value in lengths.items():
            if value != n:
                raise ValueError(f"StoredPairs: {n} prompts but {value} {label}")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def is_tie(self) -> Tensor:
        return self.prob_a == 0.5

    def column(self, hashes: Sequence[str]) -> StoredImages:
        """A column of these images from this store at this size."""
        return StoredImages(self.reader, hashes, self.size, self.read_workers)

    @property
    def images_a(self) -> StoredImages:
        return self.column(self.hashes_a)

    @property
    def images_b(self) -> StoredImages:
        return self.column(self.hashes_b)

    def select(self, index: Sequence[int] | Tensor) -> StoredPairs:
        pos = torch.as_tensor(index, dtype=torch.long).flatten().tolist()
        return StoredPairs(
            reader=self.reader,
            size=self.size,
            prompts=[self.prompts[i] for i in pos],
            hashes_a=[self.hashes_a[i] for i in pos],
            hashes_b=[self.hashes_b[i] for i in pos],
            prob_a=self.prob_a[torch.as_tensor(pos, dtype=torch.long)],
            raters=[self.raters[i] for i in pos],
            groups=[self.groups[i] for i in pos],
            keys=[self.keys[i] for i in pos],
            read_workers=self.read_workers,
        )

    def without_ties(self) -> StoredPairs:
        return self.select((~self.is_tie).nonzero().flatten())

    def load(self) -> PreferencePairs:
        """Every image read into memory: the `PreferencePairs` that `PreferenceStore.pairs` returns."""
        return PreferencePairs(
            prompts=list(self.prompts),
            images_a=self.images_a[:],
            images_b=self.images_b[:],
            prob_a=self.prob_a.clone(),
            raters=list(self.raters),
            groups=list(self.groups),
            keys=list(self.keys),
        )
