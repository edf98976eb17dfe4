"""Tokens, escaping, body limits, input validation and queue isolation."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from diffalign.collect.app import ServerConfig, create_app
from diffalign.collect.queue import PairTask, add_pairs
from diffalign.collect.storage import read_connection
from diffalign.collect.tokens import hash_token
from diffalign.prefs.schema import Rater
from tests.collect.conftest import auth, new_admin, new_rater, png, queue_pairs

ROUTES = [("get", "/annotate"), ("get", "/admin"), ("get", "/api/next"), ("get", "/api/admin/overview"),
          ("get", "/api/admin/export"), ("post", "/api/vote")]  # fmt: skip


@pytest.fixture
def setup(sqlite_store):
    queue_pairs(sqlite_store, 2)
    ann, bob, admin = new_rater(sqlite_store, "ann"), new_rater(sqlite_store, "bob"), new_admin(sqlite_store)
    client = TestClient(create_app(sqlite_store, ServerConfig(max_body_bytes=1024)))
    return sqlite_store, client, ann, bob, admin


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_missing_or_wrong_token_is_refused(setup, method, path):
    _, client, *_ = setup
    assert getattr(client, method)(path).status_code == 401
    assert getattr(client, method)(path, headers=auth("x" * 43)).status_code == 401
    assert getattr(client, method)(path, headers={"Authorization": "Basic abc"}).status_code == 401
    assert getattr(client, method)(f"{path}?token={'y' * 43}").status_code == 401


def test_rater_and_admin_tokens_open_only_their_routes(setup):
    _, client, ann, _, admin = setup
    for path in ("/admin", "/api/admin/overview", "/api/admin/export"):
        assert client.get(path, headers=auth(ann)).status_code == 403
    assert client.get("/api/next", headers=auth(admin)).status_code == 403
    assert client.get(f"/admin?token={admin}").status_code == 200


def test_tokens_are_stored_hashed(setup):
    store, _, ann, *_ = setup
    with read_connection(store) as conn:
        stored = conn.execute(select(Rater.token_sha256).where(Rater.name == "ann")).scalar_one()
    assert stored == hash_token(ann) and ann not in stored
    assert ann.encode() not in Path(store.url.removeprefix("sqlite:///")).read_bytes()


def test_another_raters_pair_and_images_cannot_be_reached(setup):
    store, client, ann, bob, _ = setup
    pair = client.get("/api/next", headers=auth(ann)).json()
    body = {"assignment_id": pair["assignment_id"], "vote": "left", "idempotency_key": "bob-tries-1"}
    assert client.post("/api/vote", json=body, headers=auth(bob)).status_code == 403
    assert client.get(pair["left"], headers=auth(bob)).status_code == 403  # not in bob's queue yet
    body["assignment_id"] = 999
    assert client.post("/api/vote", json=body, headers=auth(ann)).status_code == 404
    assert store.count("collect") == 0


def test_a_script_tag_is_text_in_the_page_and_data_in_the_api(sqlite_store):
    evil = "<script>alert(1)</script>"
    add_pairs(sqlite_store, [PairTask(f"a red circle {evil}", png(1), png(2))], 1, batch="x")
    token = new_rater(sqlite_store, f"eve {evil}")
    client = TestClient(create_app(sqlite_store))
    page = client.get(f"/annotate?token={token}")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and evil not in page.text
    assert "script-src 'nonce-" in page.headers["content-security-policy"]
    pair = client.get("/api/next", headers=auth(token))
    assert pair.headers["content-type"] == "application/json" and pair.json()["prompt"].endswith(evil)


def test_oversized_bodies_are_refused(setup):
    store, client, ann, *_ = setup
    pair = client.get("/api/next", headers=auth(ann)).json()
    big = {"assignment_id": pair["assignment_id"], "vote": "left", "idempotency_key": "k" * 20}
    big["pad"] = "x" * 4000
    assert client.post("/api/vote", json=big, headers=auth(ann)).status_code == 413

    def chunks():  # no Content-Length: the limit counts the bytes as they arrive
        for _ in range(10):
            yield b"x" * 500

    assert client.post("/api/vote", content=chunks(), headers=auth(ann)).status_code == 413
    assert store.count("collect") == 0


@pytest.mark.parametrize(
    "body",
    [
        {"assignment_id": 1, "vote": "up", "idempotency_key": "abcdefgh"},
        {"assignment_id": 1, "vote": "left", "idempotency_key": "short"},
        {"assignment_id": 1, "vote": "left", "idempotency_key": "has spaces in it"},
        {"assignment_id": -1, "vote": "left", "idempotency_key": "abcdefgh"},
        {"assignment_id": 1, "vote": "left", "idempotency_key": "abcdefgh", "extra": 1},
        {"vote": "left", "idempotency_key": "abcdefgh"},
    ],
)
def test_invalid_votes_are_refused_with_422(setup, body):
    store, client, ann, *_ = setup
    client.get("/api/next", headers=auth(ann))
    assert client.post("/api/vote", json=body, headers=auth(ann)).status_code == 422
    assert store.count("collect") == 0


def test_a_revoked_token_stops_working(setup):
    from diffalign.collect.storage import write_transaction
    from diffalign.collect.tokens import revoke_rater

    store, client, ann, *_ = setup
    assert client.get("/api/next", headers=auth(ann)).status_code == 200
    with write_transaction(store) as (conn, _):
        revoke_rater(conn, "ann")
    assert client.get("/api/next", headers=auth(ann)).status_code == 401
