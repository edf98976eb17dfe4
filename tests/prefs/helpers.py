"""Image bytes and comparisons for the preference-store tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from diffalign.prefs.records import NewComparison


def image_bytes(seed: int, size: int = 16, fmt: str = "PNG") -> bytes:
    """A distinct image per seed, encoded as `fmt`."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def comparison(i: int, *, source: str = "test", key: str | None = None, **overrides) -> NewComparison:
    """Comparison i: prompt i % 5, images 2i and 2i+1, image i % 2 chosen, rater i % 3."""
    fields = dict(
        prompt=f"prompt {i % 5}",
        images=[image_bytes(2 * i), image_bytes(2 * i + 1)],
        choice="image",
        chosen=i % 2,
        rater=f"rater{i % 3}",
        rater_group="warm" if i % 3 else "cool",
        source=source,
        key=key,
        where=f"row {i}",
    )
    fields.update(overrides)
    return NewComparison(**fields)
