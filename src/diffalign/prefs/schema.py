"""The preference store's tables (SQLAlchemy 2 declarative models).

prompts ─< comparisons >─ raters
              │
              └─< comparison_images >─ images (content-addressed by sha256; the bytes live in files)

Every comparison has a unique `key` (its idempotency key), so writing the same comparison twice, by an
import run twice or a client retrying, adds nothing.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = "1"


class Base(DeclarativeBase):
    pass


class StoreMeta(Base):
    """Key-value facts about the store itself (schema version, creation time)."""

    __tablename__ = "store_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    text_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    text: Mapped[str] = mapped_column(Text)


class Image(Base):
    """An image file under the store's folder, named by the sha256 of its bytes."""

    __tablename__ = "images"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    relpath: Mapped[str] = mapped_column(String(200))
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Rater(Base):
    """Who made choices: a person, a simulated rater, or an imported dataset's user id."""

    __tablename__ = "raters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    group: Mapped[str | None] = mapped_column(String(100), nullable=True)
    token_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Comparison(Base):
    """One choice among two or more images shown for a prompt: an image, a tie, or skipped."""

    __tablename__ = "comparisons"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    rater_id: Mapped[int | None] = mapped_column(ForeignKey("raters.id"), nullable=True)
    source: Mapped[str] = mapped_column(String(100))
    choice: Mapped[str] = mapped_column(String(8))
    chosen_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_images: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    meta: Mapped[dict] = mapped_column(JSON, default=dict)

    __table_args__ = (Index("ix_comparisons_source", "source"),)


class ComparisonImage(Base):
    """The images of a comparison, in display order."""

    __tablename__ = "comparison_images"
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_sha256: Mapped[str] = mapped_column(ForeignKey("images.sha256"))
    meta: Mapped[dict] = mapped_column(JSON, default=dict)

    __table_args__ = (Index("ix_comparison_images_image", "image_sha256"),)
