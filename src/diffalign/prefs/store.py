"""The preference store: comparisons in a database, image files under the store's folder.

`PreferenceStore.open("prefs.db")` is a SQLite file in WAL mode with its images in `prefs.images/`
beside it; `PreferenceStore.open("postgresql+psycopg://...", images_dir=...)` is the same store on any
database SQLAlchemy speaks (PostgreSQL for a team). Images are content-addressed: a file is named by the
sha256 of its bytes, written once, never re-encoded.

Every `add` is one transaction. A bad row, an invalid comparison or an unreadable image aborts it with
an error naming where the row came from and leaves the store exactly as it was: new image files are
staged in a private folder and moved into place only just before the database commits. With
`skip_bad=True` such rows are skipped and reported instead. A comparison whose key is already stored
adds nothing, so an import run twice, or a client that retries, never counts twice.

Several processes may write at once: SQLite writers take the write lock when their transaction begins
(BEGIN IMMEDIATE, with a busy timeout), PostgreSQL relies on the unique keys with ON CONFLICT DO NOTHING.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import Connection, Engine, create_engine, event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError

from diffalign.images import displayed_rgb, fit_square
from diffalign.prefs.pairs import PreferencePairs
from diffalign.prefs.records import (
    CHOICE_IMAGE,
    CHOICE_SKIP,
    CHOICE_TIE,
    BadRow,
    ImportReport,
    NewComparison,
    StoredComparison,
)
from diffalign.prefs.schema import (
    SCHEMA_VERSION,
    Base,
    Comparison,
    ComparisonImage,
    Prompt,
    Rater,
    StoreMeta,
)
from diffalign.prefs.schema import Image as ImageRow
from diffalign.prefs.stored_pairs import StoredPairs

_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
# A multi-picture JPEG (MPO: phones, stereo cameras) is a JPEG file whose first picture every JPEG reader
# shows; PIL names its format MPO. It is stored, like any JPEG, as the bytes it is.
_SAME_FORMAT = {"MPO": "JPEG"}
_ORIENTATION = 0x0112  # the EXIF tag; values 5 to 8 turn the picture a quarter, swapping width and height
_IMAGE_BATCH = 500  # comparisons read per page by `comparisons()`


class StoreError(Exception):
    """The store cannot be opened or used as asked."""


class ImportAborted(StoreError, ValueError):  # noqa: N818 (named for what happened)
    """A write stopped at a bad row; nothing of it was kept.

    Attributes:
        where: where the row came from ("train.parquet row 17").
        reason: what is wrong with it.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        location = where or "a comparison"
        super().__init__(
            f"{location}: {reason} (nothing was imported; the store is unchanged; "
            "skip bad rows with --skip-bad / skip_bad=True)"
        )


@dataclass(frozen=True)
class ImageInfo:
    """What the store knows about one image."""

    sha256: str
    format: str
    width: int
    height: int
    size_bytes: int
    path: Path
    meta: dict


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; every datetime the store hands out is timezone-aware UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def _inspect_image(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) of encoded image bytes; raises ValueError when they do not decode."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"image must be encoded bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("image is empty (0 bytes)")
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            im.load()  # decodes the pixels: catches truncated and corrupt files, not only bad headers
            fmt = im.format or "UNKNOWN"
            width, height = im.size
            if im.getexif().get(_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width  # the size it is shown at (and `load_image` returns)
    except UnidentifiedImageError as err:
        raise ValueError("not an image file PIL can read (unknown or corrupt header)") from err
    except PILImage.DecompressionBombError as err:
        raise ValueError(f"image is too large to decode safely: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"image does not decode: {err}") from err
    fmt = _SAME_FORMAT.get(fmt, fmt)
    if fmt not in _EXTENSIONS:
        raise ValueError(f"image format {fmt} is not stored (use one of {sorted(_EXTENSIONS)})")
    return fmt, width, height


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 120})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # let SQLAlchemy's "begin" below open transactions
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=120000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A writer takes the lock up front, so two writers never deadlock upgrading a read lock.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


@functools.lru_cache(maxsize=64)
def _insert_ignore_statement(dialect: str, table, conflict: tuple[str, ...], returning):
    """INSERT ... ON CONFLICT DO NOTHING, built once per table and dialect (values are bound at execute
    time, so SQLAlchemy compiles it once instead of once per row)."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        raise StoreError(
            f"the preference store supports SQLite and PostgreSQL, not {dialect!r} "
            "(it needs INSERT ... ON CONFLICT DO NOTHING for idempotent writes)"
        )
    statement = dialect_insert(table).on_conflict_do_nothing(index_elements=list(conflict))
    return statement.returning(returning) if returning is not None else statement


def _insert_ignore(conn: Connection, table, values: dict, conflict: list[str], returning=None):
    """INSERT that does nothing when a unique key already exists; returns the result.

    With `returning` (a column), the result holds that column of the inserted row, or no row when the
    key existed (portable, where rowcount after ON CONFLICT is not reported alike by every driver).
    """
    statement = _insert_ignore_statement(conn.dialect.name, table, tuple(conflict), returning)
    return conn.execute(statement, values)


def _make_staging(folder: Path, attempts: int = 20) -> None:
    """Create this write's staging folder. Another writer removes the shared `.staging` parent when it
    finds it empty, which can happen between creating the parent and the child: retry then."""
    for attempt in range(attempts):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise


class _Writer:
    """The state of one write transaction: caches and the staged image files."""

    def __init__(self, store: PreferenceStore, conn: Connection) -> None:
        self.store = store
        self.conn = conn
        self.staging = store.images_dir / ".staging" / uuid.uuid4().hex
        self.staged: dict[str, Path] = {}  # sha256 -> staged file, for images new to the store
        self.known_images: set[str] = set()
        self.prompt_ids: dict[str, int] = {}
        self.rater_ids: dict[str, int] = {}

    # -- images ------------------------------------------------------------------------------------

    def image(self, data: bytes, meta: dict) -> str:
        sha = _sha256(bytes(data))
        if sha in self.known_images or sha in self.staged:
            return sha
        exists = self.conn.execute(select(ImageRow.sha256).where(ImageRow.sha256 == sha)).first()
        if exists:
            self.known_images.add(sha)
            return sha
        fmt, width, height = _inspect_image(data)
        relpath = f"{sha[:2]}/{sha}.{_EXTENSIONS[fmt]}"
        if not self.staged:
            _make_staging(self.staging)
        staged = self.staging / f"{sha}.{_EXTENSIONS[fmt]}"
        staged.write_bytes(data)
        self.staged[sha] = staged
        _insert_ignore(
            self.conn,
            ImageRow,
            dict(
                sha256=sha,
                format=fmt,
                width=width,
                height=height,
                size_bytes=len(data),
                relpath=relpath,
                meta=meta,
                created_at=_utcnow(),
            ),
            ["sha256"],
        )
        return sha

    def publish(self) -> list[Path]:
        """Move staged files into place (before the commit); returns the files that are new."""
        placed = []
        folders: set[Path] = set()
        for sha, staged in self.staged.items():
            final = self.store.images_dir / sha[:2] / staged.name
            if final.exists():
                staged.unlink()
                continue
            if final.parent not in folders:
                final.parent.mkdir(parents=True, exist_ok=True)
                folders.add(final.parent)
            os.replace(staged, final)
            placed.append(final)
        return placed

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        with contextlib.suppress(OSError):  # removed only when no other write is staging files
            self.staging.parent.rmdir()

    # -- prompts and raters --------------------------------------------------------------------------

    def prompt(self, text: str) -> int:
        digest = _sha256(text)
        if digest in self.prompt_ids:
            return self.prompt_ids[digest]
        _insert_ignore(self.conn, Prompt, dict(text_sha256=digest, text=text), ["text_sha256"])
        pid = self.conn.execute(select(Prompt.id).where(Prompt.text_sha256 == digest)).scalar_one()
        self.prompt_ids[digest] = pid
        return pid

    def rater(self, name: str, group: str | None) -> int:
        if name in self.rater_ids:
            return self.rater_ids[name]
        _insert_ignore(self.conn, Rater, dict(name=name, group=group, created_at=_utcnow()), ["name"])
        rid, stored_group = self.conn.execute(select(Rater.id, Rater.group).where(Rater.name == name)).one()
        if stored_group is None and group is not None:
            self.conn.execute(update(Rater).where(Rater.id == rid).values(group=group))
        self.rater_ids[name] = rid
        return rid

    # -- comparisons ---------------------------------------------------------------------------------

    def comparison(self, item: NewComparison) -> bool:
        """Write one comparison; False when its key was already stored."""
        problem = item.problem()
        if problem:
            raise ValueError(problem)
        image_meta = item.image_meta or [{} for _ in item.images]
        hashes = []
        for position, (data, meta) in enumerate(zip(item.images, image_meta)):
            try:
                hashes.append(self.image(data, meta))
            except ValueError as err:
                raise ValueError(f"image {position}: {err}") from err
        key = item.key or item.content_key(hashes)
        if len(key) > 255:
            raise ValueError(f"key is longer than 255 characters ({len(key)})")
        values = dict(
            key=key,
            prompt_id=self.prompt(item.prompt),
            rater_id=self.rater(item.rater, item.rater_group) if item.rater else None,
            source=item.source,
            choice=item.choice,
            chosen_index=item.chosen,
            n_images=len(hashes),
            created_at=_as_utc(item.created_at) if item.created_at else _utcnow(),
            meta=item.meta,
        )
        cid = _insert_ignore(self.conn, Comparison, values, ["key"], returning=Comparison.id).scalar()
        if cid is None:
            return False
        self.conn.execute(
            insert(ComparisonImage),
            [
                dict(comparison_id=cid, position=i, image_sha256=sha, meta=meta)
                for i, (sha, meta) in enumerate(zip(hashes, image_meta))
            ],
        )
        return True


class PreferenceStore:
    """Prompts, images, raters and comparisons; see the module doc."""

    def __init__(self, url: str, images_dir: Path, *, create: bool = True) -> None:
        self.url = url
        self.images_dir = images_dir
        try:
            parsed = make_url(url)
        except ArgumentError as err:
            raise StoreError(f"not a database URL or SQLite path: {url!r} ({err})") from err
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            database = parsed.database
            if not database or database == ":memory:":
                raise StoreError("an in-memory SQLite store cannot be shared; give a file path")
            if not create and not Path(database).exists():
                raise StoreError(f"no preference store at {database}")
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            self._write_engine = _sqlite_engine(url, immediate=True)
            self._read_engine = _sqlite_engine(url, immediate=False)
        else:
            self._write_engine = self._read_engine = create_engine(url, pool_pre_ping=True)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._initialise(create)

    @classmethod
    def open(
        cls, location: str | Path, images_dir: str | Path | None = None, *, create: bool = True
    ) -> PreferenceStore:
        """Open (or create) a store.

        Args:
            location: a SQLite file path (`prefs.db`) or any SQLAlchemy URL.
            images_dir: where image files live; default `<stem>.images/` beside a SQLite file. A
                server URL needs it.
            create: create the tables when the database is new (False: a missing store is an error).
        """
        text = str(location)
        if "://" in text:
            url = text
            if images_dir is None:
                if text.startswith("sqlite"):
                    database = make_url(text).database or ""
                    images_dir = Path(database).with_suffix(".images")
                else:
                    raise StoreError(
                        f"a store at {make_url(text).render_as_string(hide_password=True)} needs images_dir "
                        "(--images DIR): the folder where its image files live"
                    )
        else:
            path = Path(text)
            if path.is_dir():
                raise StoreError(
                    f"{path} is a folder; a store is a database file such as {path / 'prefs.db'}"
                )
            url = f"sqlite:///{path.resolve()}"
            images_dir = images_dir or path.with_suffix(".images")
        return cls(url, Path(images_dir).resolve(), create=create)

    def _initialise(self, create: bool) -> None:
        try:
            with self._write_engine.begin() as conn:
                if create:
                    Base.metadata.create_all(conn)
                    _insert_ignore(conn, StoreMeta, dict(key="schema_version", value=SCHEMA_VERSION), ["key"])
                    _insert_ignore(
                        conn, StoreMeta, dict(key="created_at", value=_utcnow().isoformat()), ["key"]
                    )
                version = conn.execute(
                    select(StoreMeta.value).where(StoreMeta.key == "schema_version")
                ).scalar()
        except DatabaseError as err:  # OperationalError, and "file is not a database"
            raise StoreError(f"cannot open the preference store {self.describe()}: {err.orig}") from err
        if version is None:
            raise StoreError(f"{self.describe()} is not a diffalign preference store (no schema version)")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.describe()} has schema version {version}; "
                f"this diffalign reads version {SCHEMA_VERSION}"
            )

    def describe(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self._write_engine.dispose()
        if self._read_engine is not self._write_engine:
            self._read_engine.dispose()

    def __enter__(self) -> PreferenceStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------------------

    def add(
        self,
        items: Iterable[NewComparison | BadRow],
        *,
        skip_bad: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> ImportReport:
        """Write comparisons in one transaction (see the module doc for errors and idempotency).

        Args:
            items: comparisons, and `BadRow`s for rows a reader could not read.
            skip_bad: skip bad rows and list them in the report instead of aborting.
            progress: called with the number of items handled so far, every 100 items and at the end.
        """
        report = ImportReport()
        with self._write_engine.connect() as conn:
            writer = _Writer(self, conn)
            placed: list[Path] = []
            try:
                with conn.begin():
                    for n, item in enumerate(items, start=1):
                        self._add_one(writer, item, report, skip_bad)
                        if progress is not None and n % 100 == 0:
                            progress(n)
                    report.new_images = len(writer.staged)
                    placed = writer.publish()
                if progress is not None:
                    progress(report.added + report.duplicates + len(report.skipped))
            except BaseException:
                self._unpublish(placed)
                raise
            finally:
                writer.discard()
        return report

    def _add_one(
        self, writer: _Writer, item: NewComparison | BadRow, report: ImportReport, skip_bad: bool
    ) -> None:
        if isinstance(item, BadRow):
            bad = item
        elif isinstance(item, NewComparison):
            # A savepoint lets a skipped row take back whatever it wrote before failing.
            savepoint = writer.conn.begin_nested() if skip_bad else None
            staged_before = set(writer.staged)
            try:
                added = writer.comparison(item)
            except ValueError as err:
                if savepoint is not None:
                    savepoint.rollback()
                for sha in set(writer.staged) - staged_before:
                    writer.staged.pop(sha).unlink(missing_ok=True)
                bad = BadRow(item.where, str(err))
            else:
                if savepoint is not None:
                    savepoint.commit()
                if added:
                    report.added += 1
                else:
                    report.duplicates += 1
                return
        else:
            bad = BadRow("", f"expected NewComparison or BadRow, got {type(item).__name__}")
        if not skip_bad:
            raise ImportAborted(bad.where, bad.reason)
        report.skipped.append(bad)

    def _unpublish(self, placed: list[Path]) -> None:
        """After a failed commit, remove the files this write placed that no stored image references."""
        if not placed:
            return
        with self._read_engine.connect() as conn:
            for path in placed:
                sha = path.stem
                if conn.execute(select(ImageRow.sha256).where(ImageRow.sha256 == sha)).first() is None:
                    path.unlink(missing_ok=True)

    # -- reading -----------------------------------------------------------------------------------

    def count(self, source: str | None = None) -> int:
        with self._read_engine.connect() as conn:
            query = select(func.count(Comparison.id))
            if source is not None:
                query = query.where(Comparison.source == source)
            return int(conn.execute(query).scalar_one())

    def comparisons(
        self, source: str | None = None, batch_size: int = _IMAGE_BATCH
    ) -> Iterator[StoredComparison]:
        """Every comparison in insertion order, read in pages (bounded memory, short read transactions)."""
        last_id = 0
        while True:
            with self._read_engine.connect() as conn:
                query = (
                    select(Comparison, Prompt.text, Rater.name, Rater.group)
                    .join(Prompt, Prompt.id == Comparison.prompt_id)
                    .outerjoin(Rater, Rater.id == Comparison.rater_id)
                    .where(Comparison.id > last_id)
                    .order_by(Comparison.id)
                    .limit(batch_size)
                )
                if source is not None:
                    query = query.where(Comparison.source == source)
                rows = conn.execute(query).all()
                if not rows:
                    return
                ids = [row[0] for row in rows]
                images: dict[int, list[tuple[int, str, dict]]] = {cid: [] for cid in ids}
                for cid, position, sha, meta in conn.execute(
                    select(
                        ComparisonImage.comparison_id,
                        ComparisonImage.position,
                        ComparisonImage.image_sha256,
                        ComparisonImage.meta,
                    ).where(ComparisonImage.comparison_id.in_(ids))
                ):
                    images[cid].append((position, sha, meta or {}))
            for row in rows:
                ordered = sorted(images[row.id])
                yield StoredComparison(
                    key=row.key,
                    prompt=row.text,
                    image_hashes=[sha for _, sha, _ in ordered],
                    choice=row.choice,
                    chosen=row.chosen_index,
                    rater=row.name,
                    rater_group=row.group,
                    source=row.source,
                    created_at=_as_utc(row.created_at),
                    meta=row.meta or {},
                    image_meta=[meta for _, _, meta in ordered],
                )
            last_id = ids[-1]

    def image_info(self, sha256: str) -> ImageInfo:
        with self._read_engine.connect() as conn:
            row = conn.execute(select(ImageRow).where(ImageRow.sha256 == sha256)).first()
        if row is None:
            raise KeyError(f"no image {sha256} in the store {self.describe()}")
        return ImageInfo(
            sha256=row.sha256,
            format=row.format,
            width=row.width,
            height=row.height,
            size_bytes=row.size_bytes,
            path=self.images_dir / row.relpath,
            meta=row.meta or {},
        )

    def image_path(self, sha256: str) -> Path:
        return self.image_info(sha256).path

    def image_bytes(self, sha256: str) -> bytes:
        path = self.image_path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise StoreError(f"image {sha256} is in the database but its file {path} is missing") from err
        if _sha256(data) != sha256:
            raise StoreError(f"image file {path} does not match its hash (modified on disk?)")
        return data

    def load_image(self, sha256: str, size: int | None = None) -> np.ndarray:
        """An image as uint8 [H, W, 3] RGB, as a viewer shows it (`displayed_rgb`), brought to
        size x size when asked: scaled (bicubic) so its shorter side is `size`, then its centre cropped,
        as Diffusion-DPO's and CLIP's preprocessing do (a non-square image is not squashed; a square one
        is simply resized)."""
        with PILImage.open(io.BytesIO(self.image_bytes(sha256))) as im:
            rgb = displayed_rgb(im)
            if size is not None:
                rgb = fit_square(rgb, size)
            return np.asarray(rgb, dtype=np.uint8).copy()

    def _pair_rows(self, include_ties: bool, source: str | None) -> StoredPairs:
        """Every labelled pair's prompt, image hashes, label, rater and key (no image is read)."""
        prompts, a_list, b_list, probs, raters, groups, keys = [], [], [], [], [], [], []
        for comparison in self.comparisons(source=source):
            for a, b, prob in _expand(comparison, include_ties):
                prompts.append(comparison.prompt)
                a_list.append(comparison.image_hashes[a])
                b_list.append(comparison.image_hashes[b])
                probs.append(prob)
                raters.append(comparison.rater)
                groups.append(comparison.rater_group)
                keys.append(comparison.key)
        if not prompts:
            what = f" from source {source!r}" if source else ""
            ties = "" if include_ties else " (ties left out)"
            raise StoreError(f"the store {self.describe()} has no labelled pairs{what}{ties}")
        return StoredPairs(
            reader=self,
            size=1,  # a placeholder: `pair_references` sets the size; `pairs` reads the hashes only
            prompts=prompts,
            hashes_a=a_list,
            hashes_b=b_list,
            prob_a=torch.tensor(probs, dtype=torch.float32),
            raters=raters,
            groups=groups,
            keys=keys,
        )

    def pairs(
        self,
        *,
        size: int | None = None,
        include_ties: bool = True,
        source: str | None = None,
    ) -> PreferencePairs:
        """All comparisons as labelled pairs in memory (see `PreferencePairs` for how K images expand).

        Args:
            size: resize every image to size x size; None requires the images to share one size.
            include_ties: keep ties as pairs with probability 0.5.
            source: only comparisons from this source.
        """
        rows = self._pair_rows(include_ties, source)
        cache: dict[str, np.ndarray] = {}

        def image(sha: str) -> np.ndarray:
            if sha not in cache:
                cache[sha] = self.load_image(sha, size)
            return cache[sha]

        shapes = Counter(image(sha).shape for sha in rows.hashes_a + rows.hashes_b)
        if len(shapes) > 1:
            raise StoreError(f"the store's images differ in size {sorted(shapes)}; pass size= to resize them")

        def stack(hashes: list[str]) -> torch.Tensor:
            return torch.from_numpy(np.stack([image(sha) for sha in hashes])).permute(0, 3, 1, 2).contiguous()

        return PreferencePairs(
            prompts=rows.prompts,
            images_a=stack(rows.hashes_a),
            images_b=stack(rows.hashes_b),
            prob_a=rows.prob_a,
            raters=rows.raters,
            groups=rows.groups,
            keys=rows.keys,
        )

    def pair_references(
        self, *, size: int, include_ties: bool = True, source: str | None = None, read_workers: int = 4
    ) -> StoredPairs:
        """All comparisons as labelled pairs whose images are read only when indexed
        (`diffalign.prefs.stored_pairs`): for stores larger than memory. Every image is resized to
        size x size when read, so `size` is required (the sizes cannot be checked without reading
        every image). `read_workers` threads per image column serve `prefetch`."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        return replace(self._pair_rows(include_ties, source), size=int(size), read_workers=read_workers)

    def stats(self) -> dict:
        """Counts by source and choice, raters, groups, images and prompts."""
        with self._read_engine.connect() as conn:
            by_source: dict[str, dict[str, int]] = {}
            for source, choice, n in conn.execute(
                select(Comparison.source, Comparison.choice, func.count()).group_by(
                    Comparison.source, Comparison.choice
                )
            ):
                by_source.setdefault(source, {})[choice] = int(n)
            groups = {
                (group or "(none)"): int(n)
                for group, n in conn.execute(select(Rater.group, func.count()).group_by(Rater.group))
            }
            totals = {
                "comparisons": conn.execute(select(func.count(Comparison.id))).scalar_one(),
                "images": conn.execute(select(func.count(ImageRow.sha256))).scalar_one(),
                "image_bytes": conn.execute(
                    select(func.coalesce(func.sum(ImageRow.size_bytes), 0))
                ).scalar_one(),
                "prompts": conn.execute(select(func.count(Prompt.id))).scalar_one(),
                "raters": conn.execute(select(func.count(Rater.id))).scalar_one(),
            }
        choices = Counter()
        for counts in by_source.values():
            choices.update(counts)
        return {
            "store": self.describe(),
            "images_dir": str(self.images_dir),
            **{k: int(v) for k, v in totals.items()},
            "choices": {c: int(choices.get(c, 0)) for c in (CHOICE_IMAGE, CHOICE_TIE, CHOICE_SKIP)},
            "by_source": by_source,
            "raters_by_group": groups,
        }


def _expand(comparison: StoredComparison, include_ties: bool) -> list[tuple[int, int, float]]:
    """Pairs (index a, index b, P(a preferred)) of one comparison.

    A chosen image against each other image (K-1 pairs, in display order so the winner is A or B as
    shown); a tie gives every pair of its images probability 0.5; a skipped comparison gives nothing.
    """
    k = len(comparison.image_hashes)
    if comparison.choice == CHOICE_IMAGE and comparison.chosen is not None:
        w = comparison.chosen
        return [(min(w, o), max(w, o), 1.0 if w < o else 0.0) for o in range(k) if o != w]
    if comparison.choice == CHOICE_TIE and include_ties:
        return [(i, j, 0.5) for i in range(k) for j in range(i + 1, k)]
    return []
