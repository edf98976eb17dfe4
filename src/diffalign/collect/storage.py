"""Opening a preference store for collection, and one write transaction over the store and the queue.

The app's writes (queueing pairs with their images, claiming a pair, recording a vote) must each be one
transaction that covers the store's own tables and the collection tables, so this module opens the
store's write connection and its `_Writer` (the same code `PreferenceStore.add` uses: content-addressed
images staged and published just before the commit, idempotent prompts, raters and comparisons) instead
of calling `add`, which commits on its own.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from diffalign.collect.models import COLLECT_TABLES
from diffalign.prefs.schema import Base
from diffalign.prefs.store import PreferenceStore, StoreError, _Writer


def open_store(location: str | Path, images_dir: str | Path | None = None) -> PreferenceStore:
    """Open (or create) a preference store and the collection tables in it.

    Args:
        location: a SQLite file (`prefs.db`) or a SQLAlchemy URL (PostgreSQL).
        images_dir: the store's image folder (default `<stem>.images/` beside a SQLite file).
    """
    store = PreferenceStore.open(location, images_dir)
    try:
        with store._write_engine.begin() as conn:
            Base.metadata.create_all(conn, tables=COLLECT_TABLES)
    except OperationalError as err:
        store.close()
        raise StoreError(f"cannot create the collection tables in {store.describe()}: {err.orig}") from err
    return store


_LOCKS: weakref.WeakKeyDictionary[PreferenceStore, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _sqlite_lock(store: PreferenceStore) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(store, threading.Lock())


@contextmanager
def write_transaction(store: PreferenceStore) -> Iterator[tuple[Connection, _Writer]]:
    """One write transaction: yields (connection, store writer); commits on exit, rolls back on error.

    On SQLite the transaction takes the write lock when it begins (BEGIN IMMEDIATE), so concurrent
    writers queue; on PostgreSQL row locks (conditional UPDATEs, SELECT ... FOR UPDATE) and unique keys keep
    concurrent writers apart.
    """
    # SQLite: threads of one process queue on a lock here rather than in SQLite's busy handler, which
    # sleeps in growing steps (up to 100 ms) while it waits; other processes still queue on BEGIN IMMEDIATE.
    lock = _sqlite_lock(store) if store.dialect == "sqlite" else contextlib.nullcontext()
    with lock, store._write_engine.connect() as conn:
        writer = _Writer(store, conn)
        placed: list[Path] = []
        try:
            with conn.begin():
                yield conn, writer
                placed = writer.publish()
        except BaseException:
            store._unpublish(placed)
            raise
        finally:
            writer.discard()


def read_connection(store: PreferenceStore):
    """A read-only connection (never takes SQLite's write lock)."""
    return store._read_engine.connect()
