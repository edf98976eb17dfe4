"""Write a preference store out: Pick-a-Pic parquet, our JSONL + image files, a Hugging Face
`datasets.Dataset`, or plain parquet.

Every exporter streams `store.comparisons()` (bounded memory: parquet is written row group by row
group) and writes atomically: into a temporary file or folder that is renamed into place at the end,
so a failed export leaves no half-written output. Image bytes are written exactly as stored (never
re-encoded), so importing an export gives the same image hashes.

Pick-a-Pic and the Hugging Face dataset hold two images a row, a pick or a tie. A comparison of more
images, a skipped comparison, or a tie among more than two images cannot be written there: the export
stops with `ExportError`, unless `expand=True`, which writes a K-image pick as K-1 pairs (the chosen
image against each other one, in display order, keys `<key>#<i>-<j>`) and leaves skips and K-image
ties out (counted in the report). Expanded pairs are new comparisons: importing them back adds them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.prefs.formats._common import atomic_path, image_extension, write_file_atomic
from diffalign.prefs.formats.jsonl import FILE_NAME
from diffalign.prefs.records import CHOICE_IMAGE, CHOICE_TIE, StoredComparison

ROWS_PER_GROUP = 256
MAX_GROUP_BYTES = 64 << 20  # a row group is written once it holds this many image bytes


class ExportError(ValueError):
    """An export cannot be written as asked (nothing was written)."""


class ComparisonSource(Protocol):
    """What an exporter needs from a store (`PreferenceStore` has it)."""

    def comparisons(self, source: str | None = None) -> Iterator[StoredComparison]: ...

    def image_bytes(self, sha256: str) -> bytes: ...


@dataclass
class ExportReport:
    """What an export wrote: rows, the comparisons they came from, and what was left out and why."""

    rows: int = 0
    comparisons: int = 0
    expanded: int = 0  # comparisons of more than two images written as several pairs
    left_out: Counter = field(default_factory=Counter)  # reason -> count


@dataclass
class _Pair:
    comparison: StoredComparison
    a: int
    b: int
    label_a: float
    label_b: float
    key: str
    meta: dict


def _pairs(
    store: ComparisonSource, source: str | None, expand: bool, report: ExportReport
) -> Iterator[_Pair]:
    """Each comparison as two-image rows (see the module doc for what cannot be written)."""
    for c in store.comparisons(source=source):
        report.comparisons += 1
        k = len(c.image_hashes)
        if k == 2 and c.choice == CHOICE_IMAGE:
            yield _Pair(c, 0, 1, float(c.chosen == 0), float(c.chosen == 1), c.key, c.meta)
            continue
        if k == 2 and c.choice == CHOICE_TIE:
            yield _Pair(c, 0, 1, 0.5, 0.5, c.key, c.meta)
            continue
        what = f"{k}-image {c.choice}s" if c.choice in (CHOICE_IMAGE, CHOICE_TIE) else "skipped comparisons"
        if not expand or c.choice != CHOICE_IMAGE:
            if not expand:
                raise ExportError(
                    f"comparison {c.key} ({k} images, choice {c.choice!r}) cannot be written as a pair: this "
                    "format holds two-image picks and ties. Use --expand (expand=True) to write K-image "
                    "picks as K-1 pairs and leave skips and K-image ties out, or export jsonl/parquet, "
                    "which hold every comparison"
                )
            report.left_out[what] += 1
            continue
        report.expanded += 1
        w = c.chosen
        for other in range(k):
            if other == w:
                continue
            a, b = min(w, other), max(w, other)
            meta = {**c.meta, "expanded_from": c.key, "positions": [a, b]}
            yield _Pair(c, a, b, float(a == w), float(b == w), f"{c.key}#{a}-{b}", meta)


class _GroupWriter:
    """Rows into a parquet file, one row group per ROWS_PER_GROUP rows or MAX_GROUP_BYTES of images."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema)
        self.rows: list[dict] = []
        self.bytes = 0

    def add(self, row: dict, image_bytes: int) -> None:
        self.rows.append(row)
        self.bytes += image_bytes
        if len(self.rows) >= ROWS_PER_GROUP or self.bytes >= MAX_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows, self.bytes = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _write_parquet(out: Path, schema: pa.Schema, rows: Iterator[tuple[dict, int]]) -> int:
    """Write (row, image bytes) pairs to `out` atomically; returns the row count."""
    if out.is_dir():
        raise ExportError(
            f"{out} is a folder; this export writes one parquet file, such as {out / 'prefs.parquet'}"
        )
    n = 0
    with atomic_path(out) as tmp:
        writer = _GroupWriter(tmp, schema)
        try:
            for row, size in rows:
                writer.add(row, size)
                n += 1
        finally:
            writer.close()
    return n


# --- Pick-a-Pic ---------------------------------------------------------------------------------

PICKAPIC_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("num_example_per_prompt", pa.int64()),
        ("ranking_id", pa.string()),
        ("user_id", pa.string()),
        ("diffalign_key", pa.string()),
        ("diffalign_source", pa.string()),
        ("diffalign_rater", pa.string()),
        ("diffalign_rater_group", pa.string()),
        ("diffalign_meta", pa.string()),
        ("diffalign_image_meta", pa.string()),
    ]
)


def _pickapic_row(store: ComparisonSource, p: _Pair) -> tuple[dict, int]:
    c = p.comparison
    sha = [c.image_hashes[p.a], c.image_hashes[p.b]]
    data = [store.image_bytes(h) for h in sha]
    image_meta = [c.image_meta[p.a] if c.image_meta else {}, c.image_meta[p.b] if c.image_meta else {}]
    uids = [str(m.get("uid") or h) for m, h in zip(image_meta, sha)]
    rater = c.rater
    user = rater.removeprefix("pickapic:") if rater else None
    best = "" if p.label_a == p.label_b else uids[0 if p.label_a > p.label_b else 1]
    row = {
        "are_different": sha[0] != sha[1],
        "best_image_uid": best,
        "caption": c.prompt,
        "created_at": c.created_at,
        "has_label": True,
        "image_0_uid": uids[0],
        "image_0_url": str(image_meta[0].get("url", "")),
        "image_1_uid": uids[1],
        "image_1_url": str(image_meta[1].get("url", "")),
        "jpg_0": data[0],
        "jpg_1": data[1],
        "label_0": p.label_a,
        "label_1": p.label_b,
        "model_0": str(image_meta[0].get("model", "")),
        "model_1": str(image_meta[1].get("model", "")),
        "num_example_per_prompt": int(c.meta.get("num_example_per_prompt", 1)),
        "ranking_id": None if c.meta.get("ranking_id") is None else str(c.meta["ranking_id"]),
        "user_id": user,
        "diffalign_key": p.key,
        "diffalign_source": c.source,
        "diffalign_rater": rater,
        "diffalign_rater_group": c.rater_group,
        "diffalign_meta": json.dumps(p.meta, ensure_ascii=False),
        "diffalign_image_meta": json.dumps(image_meta, ensure_ascii=False),
    }
    return row, len(data[0]) + len(data[1])


def export_pickapic(
    store: ComparisonSource, out: str | Path, *, source: str | None = None, expand: bool = False
) -> ExportReport:
    """Write Pick-a-Pic parquet: its standard columns plus `diffalign_*` columns (key, source, rater,
    group, meta, image meta) that make a re-import reproduce the comparisons exactly.

    `jpg_0`/`jpg_1` hold the stored bytes as they are, which may be PNG or WebP rather than JPEG.
    `user_id` is the rater without its 'pickapic:' prefix; `ranking_id` and `num_example_per_prompt`
    come from the comparison's meta when it has them.
    """
    report = ExportReport()
    rows = (_pickapic_row(store, p) for p in _pairs(store, source, expand, report))
    report.rows = _write_parquet(Path(out), PICKAPIC_SCHEMA, rows)
    return report


# --- plain parquet ------------------------------------------------------------------------------

PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("prompt", pa.string()),
        ("choice", pa.string()),
        ("chosen", pa.int32()),
        ("rater", pa.string()),
        ("rater_group", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("image_sha256", pa.list_(pa.string())),
        ("images", pa.list_(pa.binary())),
        ("meta", pa.string()),
        ("image_meta", pa.string()),
    ]
)


def export_parquet(store: ComparisonSource, out: str | Path, *, source: str | None = None) -> ExportReport:
    """Write every comparison (any number of images, skips included) as one parquet row: the stored
    fields, the image hashes and bytes as lists, meta and image meta as JSON text."""
    report = ExportReport()

    def rows() -> Iterator[tuple[dict, int]]:
        for c in store.comparisons(source=source):
            report.comparisons += 1
            data = [store.image_bytes(h) for h in c.image_hashes]
            row = {
                "key": c.key,
                "source": c.source,
                "prompt": c.prompt,
                "choice": c.choice,
                "chosen": c.chosen,
                "rater": c.rater,
                "rater_group": c.rater_group,
                "created_at": c.created_at,
                "image_sha256": list(c.image_hashes),
                "images": data,
                "meta": json.dumps(c.meta, ensure_ascii=False),
                "image_meta": json.dumps(c.image_meta, ensure_ascii=False),
            }
            yield row, sum(len(d) for d in data)

    report.rows = _write_parquet(Path(out), PARQUET_SCHEMA, rows())
    return report


# --- JSONL + images -----------------------------------------------------------------------------


def export_jsonl(store: ComparisonSource, out: str | Path, *, source: str | None = None) -> ExportReport:
    """Write `out/comparisons.jsonl` (the format `jsonl.py` reads) and `out/images/<sha256>.<ext>`.

    Images already in `out/images` with the right name are not rewritten (the names are content
    hashes), so exporting into the same folder twice is cheap; the JSONL file is replaced atomically.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; the jsonl export writes a folder (comparisons.jsonl, images/)")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    report = ExportReport()
    present = {p.name.split(".")[0]: p.name for p in images.iterdir() if not p.name.startswith(".")}
    with atomic_path(out / FILE_NAME) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for c in store.comparisons(source=source):
            report.comparisons += 1
            names = []
            for sha in c.image_hashes:
                if sha not in present:
                    data = store.image_bytes(sha)
                    present[sha] = f"{sha}.{image_extension(data)}"
                    write_file_atomic(images / present[sha], data)
                names.append(present[sha])
            line = {
                "prompt": c.prompt,
                "images": [f"images/{n}" for n in names],
                "choice": c.choice,
                "chosen": c.chosen,
                "rater": c.rater,
                "rater_group": c.rater_group,
                "source": c.source,
                "key": c.key,
                "created_at": c.created_at.isoformat() if c.created_at else None,
                "meta": c.meta,
                "image_meta": c.image_meta,
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            report.rows += 1
    return report


# --- Hugging Face datasets ----------------------------------------------------------------------


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise ExportError(
            "the Hugging Face export needs the 'datasets' package: pip install datasets"
        ) from err
    return datasets


def hf_features():
    """The `datasets.Features` of the Hugging Face export."""
    datasets = _datasets()
    return datasets.Features(
        {
            "key": datasets.Value("string"),
            "source": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "image_0": datasets.Image(),
            "image_1": datasets.Image(),
            "label_0": datasets.Value("float64"),
            "label_1": datasets.Value("float64"),
            "rater": datasets.Value("string"),
            "rater_group": datasets.Value("string"),
            "created_at": datasets.Value("timestamp[us, tz=UTC]"),
            "meta": datasets.Value("string"),
        }
    )


def _write_hf_arrow(store: ComparisonSource, path: Path, source: str | None, expand: bool) -> ExportReport:
    """Write the rows as an Arrow stream file (the format `datasets` memory-maps), batch by batch."""
    report = ExportReport()
    schema = hf_features().arrow_schema
    rows: list[dict] = []
    size = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:

        def flush() -> None:
            nonlocal rows, size
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows, size = [], 0

        for p in _pairs(store, source, expand, report):
            c = p.comparison
            data = [store.image_bytes(c.image_hashes[p.a]), store.image_bytes(c.image_hashes[p.b])]
            rows.append(
                {
                    "key": p.key,
                    "source": c.source,
                    "prompt": c.prompt,
                    "image_0": {"bytes": data[0], "path": None},
                    "image_1": {"bytes": data[1], "path": None},
                    "label_0": p.label_a,
                    "label_1": p.label_b,
                    "rater": c.rater,
                    "rater_group": c.rater_group,
                    "created_at": c.created_at,
                    "meta": json.dumps(p.meta, ensure_ascii=False),
                }
            )
            report.rows += 1
            size += len(data[0]) + len(data[1])
            if len(rows) >= ROWS_PER_GROUP or size >= MAX_GROUP_BYTES:
                flush()
        flush()
    return report


def to_hf_dataset(
    store: ComparisonSource, cache_dir: str | Path, *, source: str | None = None, expand: bool = False
):
    """The store's pairs as a `datasets.Dataset` memory-mapped from `cache_dir/pairs.arrow`.

    Columns: key, source, prompt, image_0, image_1 (`datasets.Image()`, the stored bytes), label_0,
    label_1 (1/0, 0/1 or 0.5/0.5 as in Pick-a-Pic), rater, rater_group, created_at, meta (JSON text).
    The file must outlive the dataset; `export_hf` saves a self-contained copy.
    """
    datasets = _datasets()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "pairs.arrow"
    _write_hf_arrow(store, path, source, expand)
    return datasets.Dataset.from_file(str(path), info=datasets.DatasetInfo(features=hf_features()))


def export_hf(
    store: ComparisonSource, out: str | Path, *, source: str | None = None, expand: bool = False
) -> ExportReport:
    """Save the pairs as a Hugging Face dataset folder (`datasets.load_from_disk(out)` reads it)."""
    datasets = _datasets()
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ExportError(f"{out} exists; the Hugging Face export writes a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        arrow = work / "pairs.arrow"
        report = _write_hf_arrow(store, arrow, source, expand)
        dataset = datasets.Dataset.from_file(str(arrow), info=datasets.DatasetInfo(features=hf_features()))
        dataset.save_to_disk(str(work / "dataset"))
        del dataset
        if out.exists():
            out.rmdir()
        (work / "dataset").rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report
