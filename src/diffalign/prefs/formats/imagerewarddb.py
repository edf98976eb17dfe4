"""ImageRewardDB, its pair configuration (`1k_pair` ... `8k_pair`), as parquet.

Each row is one expert judgement: `img_better` was ranked above `img_worse` for `prompt`. The images
are Hugging Face `Image` cells: a struct {bytes, path} (as `datasets` writes them) or plain bytes.
Also read: prompt_id, classification. The per-image `metadata-*.parquet` files (one image a row with a
rank) are not pairs; use the `_pair` configuration.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from diffalign.prefs.formats._common import checked, image_payload
from diffalign.prefs.formats._parquet import DEFAULT_BATCH_SIZE, iter_parquet_rows
from diffalign.prefs.records import CHOICE_IMAGE, BadRow, NewComparison

SOURCE = "imagerewarddb"
REQUIRED = ("img_better", "img_worse", "prompt")
OPTIONAL = ("prompt_id", "classification")
_HINT = " (ImageRewardDB pairs come from its '*_pair' configuration: img_better, img_worse, prompt)"


def read_imagerewarddb(
    path: str | Path, *, source: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE
) -> Iterator[NewComparison | BadRow]:
    """Comparisons from ImageRewardDB pair parquet (a file, a folder of shards or a glob).

    Each becomes a two-image comparison [img_better, img_worse] with chosen = 0. ImageRewardDB names no
    annotator, so `rater` is None; the key is derived from the content (importing twice adds nothing).
    """
    for item in iter_parquet_rows(path, REQUIRED, OPTIONAL, batch_size, hint=_HINT):
        if isinstance(item, BadRow):
            yield item
            continue
        where, row = item
        images, image_meta = [], []
        for column in ("img_better", "img_worse"):
            data = image_payload(row[column])
            if data is None:
                cell = row[column]
                only = (
                    f" (only the path {cell['path']!r})"
                    if isinstance(cell, dict) and cell.get("path")
                    else ""
                )
                yield BadRow(where, f"{column} holds no image bytes{only}; the images must be in the parquet")
                break
            images.append(data)
            cell = row[column]
            image_meta.append({"path": cell["path"]} if isinstance(cell, dict) and cell.get("path") else {})
        else:
            prompt = row["prompt"]
            if not isinstance(prompt, str):
                yield BadRow(where, f"prompt must be text, got {type(prompt).__name__}")
                continue
            meta = {name: str(row[name]) for name in OPTIONAL if row.get(name) is not None}
            yield checked(
                NewComparison(
                    prompt=prompt,
                    images=images,
                    choice=CHOICE_IMAGE,
                    chosen=0,
                    source=source or SOURCE,
                    meta=meta,
                    image_meta=image_meta,
                    where=where,
                )
            )
