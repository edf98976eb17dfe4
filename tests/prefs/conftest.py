"""Store fixtures: every store test runs on SQLite and, when a server is given, on PostgreSQL.

`.ci/run` starts a PostgreSQL server and sets DIFFALIGN_TEST_POSTGRES_URL (and DIFFALIGN_REQUIRE_POSTGRES=1,
so that a missing server fails the run instead of skipping). Each test gets a database of its own.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from diffalign.prefs.store import PreferenceStore

POSTGRES_URL = os.environ.get("DIFFALIGN_TEST_POSTGRES_URL", "")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(database location, images folder) of a fresh, empty store."""
    if request.param == "sqlite":
        yield str(tmp_path / "prefs.db"), tmp_path / "prefs.images"
        return
    if not POSTGRES_URL:
        if os.environ.get("DIFFALIGN_REQUIRE_POSTGRES") == "1":
            pytest.fail("DIFFALIGN_REQUIRE_POSTGRES=1 but DIFFALIGN_TEST_POSTGRES_URL is not set")
        pytest.skip("no PostgreSQL server: set DIFFALIGN_TEST_POSTGRES_URL (see .ci/postgres.sh)")
    name = f"diffalign_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield (
            make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False),
            tmp_path / "images",
        )
    finally:
        _drop_database(admin, name)
        admin.dispose()


def _drop_database(admin, name: str, attempts: int = 40) -> None:
    """DROP DATABASE ... WITH (FORCE), retried while it is refused for lack of privilege (SQLSTATE
    42501): an autovacuum worker, which belongs to the superuser, may be connected to the new database
    for a moment, and FORCE cannot end another role's session without pg_signal_backend."""
    for attempt in range(attempts):
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except DBAPIError as err:
            if getattr(err.orig, "sqlstate", None) != "42501" or attempt == attempts - 1:
                raise
            time.sleep(0.25)


@pytest.fixture
def store(store_location: tuple[str, Path]) -> Iterator[PreferenceStore]:
    location, images = store_location
    with PreferenceStore.open(location, images_dir=images) as opened:
        yield opened
