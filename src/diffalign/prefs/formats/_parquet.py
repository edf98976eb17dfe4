"""Streaming parquet input shared by the Pick-a-Pic and ImageRewardDB readers.

A shard of Pick-a-Pic is gigabytes, so a file is never read whole: `pyarrow.parquet.ParquetFile`
hands out record batches of `batch_size` rows with only the needed columns.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.prefs.records import BadRow

DEFAULT_BATCH_SIZE = 32  # rows per record batch: two images a row, so a few MB to a few tens of MB


def parquet_files(path: str | Path) -> list[Path]:
    """The parquet files `path` names, in sorted order: a file, a folder (searched recursively for
    *.parquet) or a glob pattern. Raises FileNotFoundError when it names none."""
    text = str(path)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
    else:
        p = Path(text)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"{text}: no parquet files there")
    return files


def count_parquet_rows(path: str | Path) -> int | None:
    """Rows in all the files `path` names, from their footers (None when a footer does not read)."""
    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(path))
    except (OSError, pa.ArrowException):
        return None


def iter_parquet_rows(
    path: str | Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    hint: str = "",
) -> Iterator[tuple[str, dict] | BadRow]:
    """Rows of every file `path` names as (where, {column: value}), streamed batch by batch.

    Only `required` and the present `optional` columns are read. A file that does not open, or lacks a
    required column, yields one BadRow naming the file (its rows are not read); `hint` is added to
    the reason of a missing column.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for file in parquet_files(path):
        try:
            reader = pq.ParquetFile(file)
        except (OSError, pa.ArrowException) as err:
            yield BadRow(file.name, f"not a readable parquet file: {err}")
            continue
        with reader:
            names = set(reader.schema_arrow.names)
            missing = [c for c in required if c not in names]
            if missing:
                rows = reader.metadata.num_rows
                yield BadRow(
                    f"{file.name} (all {rows} rows)",
                    f"missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
                    f"; it has {', '.join(sorted(names))}{hint}",
                )
                continue
            columns = list(required) + [c for c in optional if c in names and c not in required]
            row = 0
            try:
                for batch in reader.iter_batches(batch_size=batch_size, columns=columns):
                    for values in _microsecond_times(batch).to_pylist():
                        yield f"{file.name} row {row}", values
                        row += 1
            except (OSError, ValueError, pa.ArrowException) as err:
                yield BadRow(f"{file.name} row {row}", f"parquet data does not read: {err}")


def _microsecond_times(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` with nanosecond timestamps (Pick-a-Pic's `created_at`) cut to microseconds, Python's
    resolution: without this, `to_pylist` fails on a time with nanoseconds unless pandas is installed,
    and gives pandas Timestamps when it is."""
    if not any(pa.types.is_timestamp(f.type) and f.type.unit == "ns" for f in batch.schema):
        return batch
    fields, columns = [], []
    for field, column in zip(batch.schema, batch.columns):
        if pa.types.is_timestamp(field.type) and field.type.unit == "ns":
            field = field.with_type(pa.timestamp("us", tz=field.type.tz))
            column = column.cast(field.type, safe=False)
        fields.append(field)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields, metadata=batch.schema.metadata))
