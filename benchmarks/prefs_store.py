"""Preference-store throughput: writes, a Pick-a-Pic import and export, and reading pairs back.

Baseline: one transaction per comparison (what a naive importer or a web handler does), measured in
the same run as the store's batched write (one transaction for the whole import). Images are 32x32
PNGs of random pixels (about 3 kB each), two per comparison.

    python benchmarks/prefs_store.py [--n 2000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from diffalign.prefs.formats import export_format, read_format
from diffalign.prefs.records import NewComparison
from diffalign.prefs.store import PreferenceStore


def png(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def comparisons(n: int, offset: int = 0) -> list[NewComparison]:
    return [
        NewComparison(
            prompt=f"prompt {i % 97}",
            images=[png(2 * (i + offset)), png(2 * (i + offset) + 1)],
            choice="image",
            chosen=i % 2,
            rater=f"rater{i % 20}",
            rater_group="g" + str(i % 2),
            source="bench",
        )
        for i in range(n)
    ]


def pickapic_file(path: Path, n: int, offset: int) -> Path:
    rows = {
        "caption": [f"prompt {i % 97}" for i in range(n)],
        "jpg_0": [png(10**6 + 2 * (i + offset)) for i in range(n)],
        "jpg_1": [png(10**6 + 2 * (i + offset) + 1) for i in range(n)],
        "label_0": [float(i % 2) for i in range(n)],
        "label_1": [float(1 - i % 2) for i in range(n)],
        "user_id": [i % 50 for i in range(n)],
        "ranking_id": [offset + i for i in range(n)],
        "model_0": ["a"] * n,
        "model_1": ["b"] * n,
    }
    pq.write_table(pa.table(rows), path, row_group_size=256)
    return path


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(n: int, location: str | None, workdir: Path) -> list[dict]:
    results = []

    def open_store(name: str) -> PreferenceStore:
        if location is None:
            return PreferenceStore.open(workdir / f"{name}.db")
        return PreferenceStore.open(location, images_dir=workdir / f"{name}-images")

    per_row_items = comparisons(n, offset=0)
    batched_items = comparisons(n, offset=n)
    with open_store("per_row") as store:
        seconds, _ = timed(lambda: [store.add([item]) for item in per_row_items])
    results.append(
        {"operation": "write, one transaction per comparison (baseline)", "n": n, "seconds": seconds}
    )
    baseline = n / seconds
    with open_store("batched") as store:
        seconds, _ = timed(lambda: store.add(batched_items))
        results.append(
            {"operation": "write, one transaction for all (store.add)", "n": n, "seconds": seconds}
        )
        seconds, _ = timed(lambda: store.add(batched_items))
        results.append(
            {"operation": "re-import of the same comparisons (all duplicates)", "n": n, "seconds": seconds}
        )
        seconds, pairs = timed(lambda: store.pairs())
        results.append({"operation": "read back as PreferencePairs", "n": len(pairs), "seconds": seconds})
        parquet = pickapic_file(workdir / "pickapic.parquet", n, offset=0)
        seconds, report = timed(lambda: store.add(read_format("pickapic", parquet)))
        assert report.added == n, report
        results.append({"operation": "import Pick-a-Pic parquet (read + write)", "n": n, "seconds": seconds})
        out = workdir / "export.parquet"
        seconds, _ = timed(lambda: export_format("pickapic", store, out, source="pickapic"))
        results.append({"operation": "export Pick-a-Pic parquet", "n": n, "seconds": seconds})
    for row in results:
        row["per_s"] = row["n"] / row["seconds"]
        row["vs_baseline"] = row["per_s"] / baseline
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="comparisons per operation")
    parser.add_argument("--postgres", default=None, help="a PostgreSQL URL to measure instead of SQLite")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args.n, args.postgres, Path(tmp))
    backend = "PostgreSQL" if args.postgres else "SQLite (WAL)"
    print(f"\n{backend}, {args.n} comparisons of two 32x32 PNGs\n")
    print("| operation | items/s | vs baseline |")
    print("|---|---|---|")
    for row in results:
        print(f"| {row['operation']} | {row['per_s']:,.0f} | {row['vs_baseline']:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
