"""Pick-a-Pic v1/v2 parquet shards: one row, two images, the rater's pick (or a tie).

Columns read: jpg_0, jpg_1 (encoded image bytes), label_0, label_1 (1/0: that image chosen; 0.5/0.5:
a tie), caption (the prompt), and when present user_id, ranking_id, created_at, model_0, model_1,
image_0_uid, image_1_uid, image_0_url, image_1_url, best_image_uid, has_label, are_different,
num_example_per_prompt, plus the `diffalign_*` columns our own exporter adds (see `export.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

from diffalign.prefs.formats._common import checked, image_payload, to_datetime
from diffalign.prefs.formats._parquet import DEFAULT_BATCH_SIZE, iter_parquet_rows
from diffalign.prefs.records import CHOICE_IMAGE, CHOICE_TIE, BadRow, NewComparison

SOURCE = "pickapic"
REQUIRED = ("jpg_0", "jpg_1", "label_0", "label_1", "caption")
OPTIONAL = (
    "user_id",
    "ranking_id",
    "created_at",
    "model_0",
    "model_1",
    "image_0_uid",
    "image_1_uid",
    "image_0_url",
    "image_1_url",
    "best_image_uid",
    "has_label",
    "are_different",
    "num_example_per_prompt",
    # written by diffalign's exporter, so a round trip gives back the same comparisons
    "diffalign_key",
    "diffalign_source",
    "diffalign_rater",
    "diffalign_rater_group",
    "diffalign_meta",
    "diffalign_image_meta",
)
_META_COLUMNS = (
    "ranking_id",
    "user_id",
    "best_image_uid",
    "has_label",
    "are_different",
    "num_example_per_prompt",
)


def read_pickapic(
    path: str | Path,
    *,
    source: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Iterator[NewComparison | BadRow]:
    """Comparisons from Pick-a-Pic parquet: a file, a folder of shards or a glob, in sorted order.

    Args:
        path: the parquet file(s).
        source: the comparisons' source; None: the file's `diffalign_source` column, else 'pickapic'.
        batch_size: rows per record batch (memory is about batch_size x two images).
    """
    for item in iter_parquet_rows(path, REQUIRED, OPTIONAL, batch_size):
        if isinstance(item, BadRow):
            yield item
            continue
        where, row = item
        try:
            yield _comparison(where, row, source)
        except (ValueError, TypeError, json.JSONDecodeError) as err:
            yield BadRow(where, str(err))


def _choice(row: dict) -> tuple[str, int | None]:
    """(choice, chosen) from label_0/label_1; raises ValueError when they name no preference."""
    l0, l1 = row["label_0"], row["label_1"]
    if l0 is None or l1 is None:
        raise ValueError(f"label_0/label_1 missing ({l0!r}, {l1!r})")
    pair = (float(l0), float(l1))
    if pair == (1.0, 0.0):
        return CHOICE_IMAGE, 0
    if pair == (0.0, 1.0):
        return CHOICE_IMAGE, 1
    if pair == (0.5, 0.5):
        return CHOICE_TIE, None
    if pair == (0.0, 0.0):
        raise ValueError("no preference: label_0 = label_1 = 0")
    raise ValueError(f"inconsistent labels: label_0 = {l0}, label_1 = {l1} (expected 1/0, 0/1 or 0.5/0.5)")


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _comparison(where: str, row: dict, source: str | None) -> NewComparison | BadRow:
    if row.get("has_label") is False:
        return BadRow(where, "has_label is false: the row carries no preference")
    choice, chosen = _choice(row)
    images = [image_payload(row["jpg_0"]), image_payload(row["jpg_1"])]
    for i, data in enumerate(images):
        if data is None:
            return BadRow(where, f"jpg_{i} holds no image bytes")
    uids = [_text(row.get("image_0_uid")), _text(row.get("image_1_uid"))]
    best = _text(row.get("best_image_uid"))
    if chosen is not None and best and all(uids) and best != uids[chosen]:
        other = "neither image" if best not in uids else f"image {uids.index(best)}"
        return BadRow(
            where, f"label_{chosen} = 1 says image {chosen} was chosen but best_image_uid is {other}'s uid"
        )
    prompt = row["caption"]
    if not isinstance(prompt, str):
        return BadRow(where, f"caption must be text, got {type(prompt).__name__}")
    user = _text(row.get("user_id"))
    ranking = _text(row.get("ranking_id"))

    image_meta = []
    for i in range(2):
        entry = {}
        for name, column in (("uid", f"image_{i}_uid"), ("model", f"model_{i}"), ("url", f"image_{i}_url")):
            if row.get(column) not in (None, ""):
                entry[name] = _text(row[column])
        image_meta.append(entry)
    meta = {name: _jsonable(row[name]) for name in _META_COLUMNS if not _missing(row.get(name))}

    key = f"pickapic:{ranking}" if ranking else None
    rater = f"pickapic:{user}" if user else None
    group = None
    if "diffalign_key" in row:  # our own export: the columns below are authoritative
        key = row["diffalign_key"] or key
        rater = row.get("diffalign_rater")
        group = row.get("diffalign_rater_group")
        if row.get("diffalign_meta") is not None:
            meta = json.loads(row["diffalign_meta"])
        if row.get("diffalign_image_meta") is not None:
            image_meta = json.loads(row["diffalign_image_meta"])
    if source is None:
        source = row.get("diffalign_source") or SOURCE
    try:
        created_at = to_datetime(row.get("created_at"))
    except ValueError as err:
        return BadRow(where, f"created_at is not a time: {err}")
    return checked(
        NewComparison(
            prompt=prompt,
            images=images,
            choice=choice,
            chosen=chosen,
            rater=rater,
            rater_group=group,
            source=source,
            key=key,
            created_at=created_at,
            meta=meta,
            image_meta=image_meta,
            where=where,
        )
    )


def _missing(value: object) -> bool:
    """None, or a float NaN (how pandas writes a missing value into a numeric column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _jsonable(value: object) -> object:
    return value if isinstance(value, bool | int | float | str) else str(value)
