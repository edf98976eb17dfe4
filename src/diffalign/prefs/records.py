"""The records that cross the preference store's boundary: what importers write and what readers get back.

Format readers yield `NewComparison` for a good row and `BadRow` for a row they cannot read (a generator
cannot raise and go on, so a bad row is a value); the store decides, by `skip_bad`, whether a bad row
rolls the whole import back or is skipped and reported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime

CHOICE_IMAGE = "image"
CHOICE_TIE = "tie"
CHOICE_SKIP = "skip"
CHOICES = (CHOICE_IMAGE, CHOICE_TIE, CHOICE_SKIP)


def prompt_text(value: object, where: str, error: type[ValueError] = ValueError) -> str:
    """A prompt read from a file, stripped: non-empty text without a NUL character (PostgreSQL's text
    cannot hold one; a NUL in a prompt is a damaged file), else `error` naming `where`."""
    if not isinstance(value, str) or not value.strip():
        raise error(f"{where}: 'prompt' must be non-empty text, got {value!r}")
    if "\x00" in value:
        raise error(f"{where}: the prompt has a NUL character")
    return value.strip()


@dataclass
class NewComparison:
    """One comparison to write: a prompt, two or more encoded images, and what the rater chose.

    Attributes:
        prompt: the prompt the images were generated for.
        images: the encoded image files (PNG, JPEG, WebP, ... bytes), at least two, in display order.
        choice: 'image' (then `chosen` is the index of the preferred image), 'tie' or 'skip'.
        chosen: index into `images` of the preferred image when choice == 'image', else None.
        rater: the rater's name (None when the source does not say).
        rater_group: the rater's group, for pluralistic reward models (None when unknown).
        source: where the comparison comes from: 'simulated', 'pickapic', 'hpdv2', 'collect', ...
        key: idempotency key, unique in the store; writing a comparison whose key exists adds nothing.
            None derives it from the content (source, prompt, images, choice, rater), so importing the
            same data twice adds nothing either way.
        created_at: when the choice was made (None: now).
        meta: extra fields kept with the comparison (model names, ranking ids, utilities, ...); JSON.
        image_meta: per image, extra fields kept with the image (model name, uid, ...); JSON.
        where: where the row came from, for error messages ("train.parquet row 17").
    """

    prompt: str
    images: list[bytes]
    choice: str
    chosen: int | None = None
    rater: str | None = None
    rater_group: str | None = None
    source: str = "local"
    key: str | None = None
    created_at: datetime | None = None
    meta: dict = field(default_factory=dict)
    image_meta: list[dict] | None = None
    where: str = ""

    def problem(self) -> str | None:
        """Why this comparison cannot be stored, or None when it can (image bytes are checked later)."""
        if not isinstance(self.prompt, str):
            return f"prompt must be text, got {type(self.prompt).__name__}"
        if len(self.images) < 2:
            return f"a comparison needs at least two images, got {len(self.images)}"
        if self.choice not in CHOICES:
            return f"choice must be one of {CHOICES}, got {self.choice!r}"
        if self.choice == CHOICE_IMAGE:
            if not isinstance(self.chosen, int) or not 0 <= self.chosen < len(self.images):
                return f"chosen must index one of the {len(self.images)} images, got {self.chosen!r}"
        elif self.chosen is not None:
            return f"choice {self.choice!r} cannot name a chosen image ({self.chosen})"
        if self.image_meta is not None and len(self.image_meta) != len(self.images):
            return f"{len(self.images)} images but {len(self.image_meta)} image_meta entries"
        try:  # strict JSON: NaN and Infinity are not JSON (PostgreSQL refuses them, so do other readers)
            json.dumps(self.meta, allow_nan=False)
            json.dumps(self.image_meta, allow_nan=False)
        except (TypeError, ValueError) as err:
            return f"meta is not JSON: {err}"
        return None

    def content_key(self, image_hashes: list[str]) -> str:
        """The key derived from content when none is given."""
        body = json.dumps(
            [self.source, self.prompt, image_hashes, self.choice, self.chosen, self.rater], ensure_ascii=False
        )
        return "sha256:" + hashlib.sha256(body.encode("utf-8")).hexdigest()


@dataclass
class BadRow:
    """A row a reader could not turn into a comparison: where it is and why."""

    where: str
    reason: str


@dataclass
class StoredComparison:
    """A comparison read back from the store.

    Attributes:
        key: its idempotency key.
        prompt: the prompt text.
        image_hashes: sha256 of each image, in display order.
        choice: 'image', 'tie' or 'skip'; `chosen` is the index of the preferred image for 'image'.
        rater, rater_group: who chose (None when unknown).
        source: where it came from.
        created_at: when the choice was made.
        meta: the extra fields given at import.
        image_meta: per image, the extra fields given at import.
    """

    key: str
    prompt: str
    image_hashes: list[str]
    choice: str
    chosen: int | None
    rater: str | None
    rater_group: str | None
    source: str
    created_at: datetime
    meta: dict
    image_meta: list[dict]


@dataclass
class ImportReport:
    """What a write added: new comparisons, duplicates already present, and skipped bad rows."""

    added: int = 0
    duplicates: int = 0
    new_images: int = 0
    skipped: list[BadRow] = field(default_factory=list)
