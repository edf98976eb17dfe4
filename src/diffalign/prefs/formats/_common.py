"""Helpers the format readers and exporters share: image payloads, timestamps, atomic file writes."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from diffalign.prefs.records import BadRow, NewComparison

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)


def image_payload(value: object) -> bytes | None:
    """The encoded bytes of an image cell: raw bytes, or a Hugging Face `Image` struct {bytes, path}.

    Returns None when the cell holds no bytes (null, or a struct with only a path).
    """
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return None


def image_problem(data: bytes | None) -> str | None:
    """Why `data` is not a readable image, or None. A cheap check (header and structure, PIL `verify`);
    the store decodes every pixel when it writes the image."""
    if data is None:
        return "no image bytes"
    if len(data) == 0:
        return "image is empty (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except UnidentifiedImageError:
        return f"image does not decode: not a known image format ({len(data)} bytes starting {data[:8]!r})"
    except Image.DecompressionBombError as err:
        return f"image is too large to decode safely: {err}"
    except (OSError, SyntaxError, ValueError) as err:
        return f"image does not decode: {err}"
    return None


def image_extension(data: bytes) -> str:
    """A file extension for encoded image bytes, from their magic number ('bin' when unknown)."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


def to_datetime(value: object) -> datetime | None:
    """A timestamp cell or ISO 8601 text as a datetime (naive values are taken as UTC); None stays None.

    Raises ValueError for text that is not ISO 8601 and for other types.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        result = value
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        result = datetime.fromisoformat(text)
    elif hasattr(value, "to_pydatetime"):  # a pandas Timestamp
        result = value.to_pydatetime()
    else:
        raise ValueError(f"a timestamp must be ISO 8601 text, got {type(value).__name__}")
    return result.replace(tzinfo=timezone.utc) if result.tzinfo is None else result


def checked(item: NewComparison, check_images: bool = True) -> NewComparison | BadRow:
    """`item`, or a BadRow at its `where` when `NewComparison.problem()` or an image check objects."""
    problem = item.problem()
    if problem is None and check_images:
        for i, data in enumerate(item.images):
            reason = image_problem(data)
            if reason is not None:
                problem = f"image {i}: {reason}"
                break
    return item if problem is None else BadRow(item.where, problem)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path beside `final` that replaces it on success and is removed on failure."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename (never a half-written file)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
