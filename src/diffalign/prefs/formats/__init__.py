"""Preference data formats: readers that turn a dataset into comparisons, exporters that write a store.

`read_format(name, path, ...)` yields `NewComparison` for each good row and `BadRow` for each row it
cannot read; hand the stream to `PreferenceStore.add`, which rolls back or skips bad rows. `FORMATS`
lists the readers, `EXPORTS` the exporters (see `docs/preferences.md`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from diffalign.prefs.formats.export import (
    ExportError,
    ExportReport,
    export_hf,
    export_jsonl,
    export_parquet,
    export_pickapic,
    to_hf_dataset,
)
from diffalign.prefs.formats.hpdv2 import read_hpdv2
from diffalign.prefs.formats.imagerewarddb import read_imagerewarddb
from diffalign.prefs.formats.jsonl import read_jsonl
from diffalign.prefs.formats.pickapic import read_pickapic
from diffalign.prefs.records import BadRow, NewComparison

__all__ = [
    "EXPORTS",
    "FORMATS",
    "ExportError",
    "ExportReport",
    "Exporter",
    "Format",
    "count_rows",
    "export_format",
    "read_format",
    "to_hf_dataset",
]


@dataclass(frozen=True)
class Format:
    """A reader: its function, what it reads, and which options it takes."""

    name: str
    description: str
    reader: Callable[..., Iterator[NewComparison | BadRow]]
    parquet: bool  # streams parquet (takes batch_size; path may be a folder or glob of shards)
    images_dir: bool  # images are files referenced by path (takes images_dir)


@dataclass(frozen=True)
class Exporter:
    """An exporter: its function, what it writes, and whether it takes `expand`."""

    name: str
    description: str
    writer: Callable[..., ExportReport]
    pairs_only: bool


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "pickapic",
            "Pick-a-Pic v1/v2 parquet (a file, a folder of shards or a glob)",
            read_pickapic,
            parquet=True,
            images_dir=False,
        ),
        Format(
            "hpdv2",
            "HPDv2 train.json or test.json, images beside it or in --images",
            read_hpdv2,
            parquet=False,
            images_dir=True,
        ),
        Format(
            "imagerewarddb",
            "ImageRewardDB pair parquet (img_better, img_worse, prompt)",
            read_imagerewarddb,
            parquet=True,
            images_dir=False,
        ),
        Format(
            "jsonl",
            "diffalign JSONL: one comparison a line, image paths relative to the file",
            read_jsonl,
            parquet=False,
            images_dir=True,
        ),
    )
}

EXPORTS: dict[str, Exporter] = {
    e.name: e
    for e in (
        Exporter(
            "pickapic",
            "Pick-a-Pic parquet (+ diffalign_* columns for an exact round trip)",
            export_pickapic,
            pairs_only=True,
        ),
        Exporter(
            "jsonl", "a folder: comparisons.jsonl + images/<sha256>.<ext>", export_jsonl, pairs_only=False
        ),
        Exporter(
            "hf", "a Hugging Face datasets folder (datasets.load_from_disk)", export_hf, pairs_only=True
        ),
        Exporter(
            "parquet",
            "plain parquet, one comparison a row, images as a list",
            export_parquet,
            pairs_only=False,
        ),
    )
}


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return table[name]


def read_format(
    name: str,
    path: str | Path,
    *,
    source: str | None = None,
    images_dir: str | Path | None = None,
    batch_size: int | None = None,
) -> Iterator[NewComparison | BadRow]:
    """Comparisons and bad rows from `path` in format `name` (a key of `FORMATS`).

    Args:
        name: the format.
        path: the file (a folder or glob of parquet shards for parquet formats).
        source: the comparisons' source (None: the format's default).
        images_dir: where image files are (formats that reference image files; default: beside the file).
        batch_size: parquet rows per record batch (parquet formats).

    Raises:
        ValueError: an unknown format, or an option the format does not take.
        FileNotFoundError: when iteration starts, if `path` names nothing.
    """
    spec = _lookup(FORMATS, name, "format")
    kwargs: dict = {"source": source}
    if images_dir is not None:
        if not spec.images_dir:
            raise ValueError(f"format {name!r} holds its images inline; it takes no images folder")
        kwargs["images_dir"] = images_dir
    if batch_size is not None and spec.parquet:
        kwargs["batch_size"] = batch_size
    return spec.reader(path, **kwargs)


def count_rows(name: str, path: str | Path) -> int | None:
    """How many rows `read_format(name, path)` will read, when it is cheap to know (parquet footers)."""
    if _lookup(FORMATS, name, "format").parquet:
        from diffalign.prefs.formats._parquet import count_parquet_rows

        return count_parquet_rows(path)
    return None


def export_format(name: str, store, out: str | Path, *, source: str | None = None, expand: bool = False):
    """Export `store` to `out` in format `name` (a key of `EXPORTS`); returns an `ExportReport`."""
    spec = _lookup(EXPORTS, name, "export format")
    if spec.pairs_only:
        return spec.writer(store, out, source=source, expand=expand)
    if expand:
        raise ValueError(f"export format {name!r} holds every comparison as it is; it takes no --expand")
    return spec.writer(store, out, source=source)
