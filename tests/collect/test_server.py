"""A real server process: 8 concurrent clients x 200 votes, and SIGKILL + restart between and during votes."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from diffalign.collect.models import CollectAssignment
from diffalign.collect.storage import read_connection
from tests.collect.conftest import auth, new_rater, queue_pairs
from tests.collect.server import Server

CLIENTS = 8
VOTES = 200


def _label(client: httpx.Client, token: str, n: int, tag: str, retry_every: int = 0) -> int:
    recorded = 0
    for i in range(n):
        pair = client.get("/api/next", headers=auth(token)).raise_for_status().json()
        assert not pair["done"], f"{tag}: queue ran out after {i} votes"
        body = {"assignment_id": pair["assignment_id"], "vote": ("left", "right", "tie")[i % 3],
                "idempotency_key": f"{tag}-vote-{i:05d}"}  # fmt: skip
        answer = client.post("/api/vote", json=body, headers=auth(token)).raise_for_status().json()
        recorded += answer["status"] == "recorded"
        if retry_every and i % retry_every == 0:  # a client retrying a vote it already sent
            again = client.post("/api/vote", json=body, headers=auth(token)).raise_for_status().json()
            assert again["status"] == "duplicate"
    return recorded


def test_eight_clients_of_two_hundred_votes_give_exactly_1600(any_store, tmp_path: Path):
    queue_pairs(any_store, VOTES, raters_needed=CLIENTS)
    tokens = [new_rater(any_store, f"rater{k}") for k in range(CLIENTS)]
    server = Server(any_store.url, any_store.images_dir, tmp_path / "server.log").start()
    try:

        def run(k: int) -> int:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                return _label(client, tokens[k], VOTES, f"c{k}", retry_every=50)

        with ThreadPoolExecutor(CLIENTS) as pool:
            recorded = list(pool.map(run, range(CLIENTS)))
    finally:
        server.kill()
    assert recorded == [VOTES] * CLIENTS
    assert any_store.count("collect") == CLIENTS * VOTES
    with read_connection(any_store) as conn:
        answered = conn.execute(
            select(func.count(CollectAssignment.id)).where(CollectAssignment.answered_at.is_not(None))
        ).scalar_one()
    assert answered == CLIENTS * VOTES


def test_sigkill_between_and_during_votes_loses_and_duplicates_nothing(sqlite_store, tmp_path: Path):
    queue_pairs(sqlite_store, 12)
    token = new_rater(sqlite_store, "ann")
    server = Server(sqlite_store.url, sqlite_store.images_dir, tmp_path / "server.log").start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert _label(client, token, 4, "a") == 4
            server.kill()  # between votes
            server.start()
            assert sqlite_store.count("collect") == 4
            assert _label(client, token, 4, "b") == 4
            # During a vote: send it, SIGKILL the server while it may be writing, restart, retry the same
            # key. Whether or not the first try committed, it counts exactly once.
            for attempt, delay in enumerate((0.0, 0.005, 0.02)):
                pair = client.get("/api/next", headers=auth(token)).json()
                key = f"kill-vote-{attempt}"
                body = {"assignment_id": pair["assignment_id"], "vote": "left", "idempotency_key": key}
                sent = threading.Thread(target=_post_ignoring_errors, args=(server.url, token, body))
                sent.start()
                time.sleep(delay)
                server.kill()
                sent.join()
                server.start()
                retry = client.post("/api/vote", json=body, headers=auth(token))
                assert retry.status_code == 200 and retry.json()["status"] in ("recorded", "duplicate")
                assert sqlite_store.count("collect") == 9 + attempt
    finally:
        server.kill()
    assert sqlite_store.count("collect") == 11
    keys = [c.meta["idempotency_key"] for c in sqlite_store.comparisons(source="collect")]
    assert len(keys) == len(set(keys)) == 11


def _post_ignoring_errors(url: str, token: str, body: dict) -> None:
    with contextlib.suppress(httpx.TransportError):  # the server may die before it answers
        httpx.post(f"{url}/api/vote", json=body, headers=auth(token), timeout=10)


pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::ResourceWarning")]
