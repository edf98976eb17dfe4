"""diffalign's own plain format: one JSON object a line, image files beside it.

A line: {"prompt": str, "images": [path, ...], "choice": "image" | "tie" | "skip", "chosen": int | null,
"rater": str | null, "rater_group": str | null, "source": str, "key": str | null,
"created_at": ISO 8601 | null, "meta": {...}, "image_meta": [{...}, ...] | null}. Only prompt, images
and choice are required. Image paths are relative to the file's folder (or `images_dir`). Blank lines
are ignored. The file is UTF-8 (a byte order mark is allowed), with any line endings. `export.py`
writes this format: `comparisons.jsonl` and `images/<sha256>.<ext>`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from diffalign.prefs.formats._common import checked, to_datetime
from diffalign.prefs.records import CHOICES, BadRow, NewComparison

DEFAULT_SOURCE = "local"
FILE_NAME = "comparisons.jsonl"  # what a folder holds (the exporter's layout)
_OPTIONAL_TEXT = ("rater", "rater_group", "source", "key")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that did not decode, under errors="surrogateescape"


def read_jsonl(
    path: str | Path, *, source: str | None = None, images_dir: str | Path | None = None
) -> Iterator[NewComparison | BadRow]:
    """Comparisons from a JSONL file, or a folder holding `comparisons.jsonl`; lines numbered from 1.

    Args:
        path: the file or folder.
        source: overrides every line's source (None: the line's own, else 'local').
        images_dir: the folder image paths are relative to (default: the file's folder).
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    base = Path(images_dir) if images_dir is not None else path.parent
    # UTF-8 with or without a byte order mark; a byte that is not UTF-8 becomes a lone surrogate, so the
    # line holding it is a bad row of its own instead of an error that stops the whole file.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            invalid = _NOT_UTF8.search(line)
            if invalid is not None:
                byte = ord(invalid.group()) - 0xDC00
                yield BadRow(where, f"not UTF-8 text (byte {byte:#04x} at column {invalid.start() + 1})")
                continue
            try:
                yield _comparison(where, json.loads(line), base, source)
            except json.JSONDecodeError as err:
                yield BadRow(where, f"not valid JSON: {err.msg} (column {err.colno})")
            except ValueError as err:
                yield BadRow(where, str(err))


def _comparison(where: str, obj: object, base: Path, source: str | None) -> NewComparison | BadRow:
    if not isinstance(obj, dict):
        raise ValueError(f"a line must be a JSON object, got {type(obj).__name__}")
    for name in ("prompt", "images", "choice"):
        if name not in obj:
            raise ValueError(f"missing field {name!r}")
    if not isinstance(obj["prompt"], str):
        raise ValueError(f"'prompt' must be text, got {type(obj['prompt']).__name__}")
    paths = obj["images"]
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError("'images' must be a list of file paths")
    if obj["choice"] not in CHOICES:
        raise ValueError(f"'choice' must be one of {', '.join(CHOICES)}, got {obj['choice']!r}")
    chosen = obj.get("chosen")
    if chosen is not None and (not isinstance(chosen, int) or isinstance(chosen, bool)):
        raise ValueError(f"'chosen' must be an integer or null, got {chosen!r}")
    for name in _OPTIONAL_TEXT:
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise ValueError(f"{name!r} must be text or null, got {obj[name]!r}")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"'meta' must be an object, got {type(meta).__name__}")
    image_meta = obj.get("image_meta")
    if image_meta is not None and (
        not isinstance(image_meta, list) or not all(isinstance(m, dict) for m in image_meta)
    ):
        raise ValueError("'image_meta' must be a list of objects or null")
    try:
        created_at = to_datetime(obj.get("created_at"))
    except ValueError as err:
        raise ValueError(f"'created_at' is not an ISO 8601 time: {err}") from err
    images = []
    for i, rel in enumerate(paths):
        try:
            images.append((base / rel).read_bytes())
        except FileNotFoundError:
            return BadRow(where, f"image {i} ({rel}) not found in {base}")
        except OSError as err:
            return BadRow(where, f"image {i} ({rel}) cannot be read: {err}")
    return checked(
        NewComparison(
            prompt=obj["prompt"],
            images=images,
            choice=obj["choice"],
            chosen=chosen,
            rater=obj.get("rater"),
            rater_group=obj.get("rater_group"),
            source=source or obj.get("source") or DEFAULT_SOURCE,
            key=obj.get("key"),
            created_at=created_at,
            meta=meta,
            image_meta=image_meta,
            where=where,
        )
    )
