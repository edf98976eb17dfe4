"""Collection-app fixtures: a store with the queue's tables on SQLite and (when a server is given)
PostgreSQL, small distinct PNGs, pairs queued, raters with tokens, and a TestClient."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffalign.collect.queue import PairTask, add_pairs
from diffalign.collect.storage import open_store, write_transaction
from diffalign.collect.tokens import add_rater, set_admin_token
from diffalign.prefs.store import PreferenceStore
from tests.prefs.conftest import store_location  # noqa: F401  (the SQLite/PostgreSQL parametrised fixture)


def png(seed: int, size: int = 8) -> bytes:
    """A small random PNG, different for every seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def queue_pairs(store: PreferenceStore, n: int, raters_needed: int = 1, prompt: str = "a red circle") -> int:
    pairs = [PairTask(f"{prompt} {i}", png(2 * i), png(2 * i + 1), priority=0.0) for i in range(n)]
    return add_pairs(store, pairs, raters_needed, batch="test")


def new_rater(store: PreferenceStore, name: str, group: str | None = None) -> str:
    with write_transaction(store) as (conn, _):
        return add_rater(conn, name, group)


def new_admin(store: PreferenceStore) -> str:
    with write_transaction(store) as (conn, _):
        return set_admin_token(conn)


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[PreferenceStore]:
    store = open_store(tmp_path / "prefs.db")
    yield store
    store.close()


@pytest.fixture
def any_store(store_location) -> Iterator[PreferenceStore]:  # noqa: F811
    location, images = store_location
    store = open_store(location, images)
    yield store
    store.close()
