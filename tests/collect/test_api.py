"""The rater and admin flows through the HTTP API (FastAPI's TestClient, SQLite store)."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from diffalign.collect.app import ServerConfig, create_app
from diffalign.collect.report import pairwise_agreement
from tests.collect.conftest import auth, new_admin, new_rater, queue_pairs


def _client(store, **config) -> TestClient:
    return TestClient(create_app(store, ServerConfig(**config)))


def _vote(client, token, assignment_id, vote, key):
    body = {"assignment_id": assignment_id, "vote": vote, "idempotency_key": key}
    return client.post("/api/vote", json=body, headers=auth(token))


def test_rater_flow_lands_every_vote_in_the_store_with_the_shown_order(sqlite_store):
    queue_pairs(sqlite_store, 4)
    token = new_rater(sqlite_store, "ann", group="g1")
    client = _client(sqlite_store)
    page = client.get(f"/annotate?token={token}")
    assert page.status_code == 200 and "ann" in page.text
    shown = {}
    for n, vote in enumerate(["left", "right", "tie", "skip"]):
        pair = client.get("/api/next", headers=auth(token)).json()
        assert pair["done"] is False and pair["progress"] == {"answered": n, "remaining": 4 - n, "total": 4}
        image = client.get(pair["left"], headers=auth(token))
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        shown[pair["assignment_id"]] = (pair["prompt"], pair["left"][-64:], pair["right"][-64:], vote)
        answer = _vote(client, token, pair["assignment_id"], vote, f"key-{n:04d}")
        assert answer.status_code == 200 and answer.json()["status"] == "recorded"
    done = client.get("/api/next", headers=auth(token)).json()
    assert done["done"] is True and done["progress"] == {"answered": 4, "remaining": 0, "total": 4}
    stored = list(sqlite_store.comparisons(source="collect"))
    assert len(stored) == 4
    for c in stored:
        prompt, left, right, vote = shown[c.meta["assignment"]]
        assert (c.prompt, c.image_hashes, c.rater, c.rater_group) == (prompt, [left, right], "ann", "g1")
        expected = {"left": ("image", 0), "right": ("image", 1), "tie": ("tie", None), "skip": ("skip", None)}
        assert (c.choice, c.chosen) == expected[vote]


def test_a_repeated_vote_counts_once_and_a_conflicting_one_is_refused(sqlite_store):
    queue_pairs(sqlite_store, 2)
    token = new_rater(sqlite_store, "ann")
    client = _client(sqlite_store)
    first = client.get("/api/next", headers=auth(token)).json()["assignment_id"]
    assert _vote(client, token, first, "left", "click-0001").json()["status"] == "recorded"
    assert _vote(client, token, first, "left", "click-0001").json()["status"] == "duplicate"
    assert _vote(client, token, first, "right", "click-0002").status_code == 409
    second = client.get("/api/next", headers=auth(token)).json()["assignment_id"]
    assert second != first
    assert _vote(client, token, second, "left", "click-0001").status_code == 409  # key reused elsewhere
    assert sqlite_store.count("collect") == 1


def test_an_unanswered_pair_comes_back_until_answered(sqlite_store):
    queue_pairs(sqlite_store, 3)
    token = new_rater(sqlite_store, "ann")
    client = _client(sqlite_store)
    ids = {client.get("/api/next", headers=auth(token)).json()["assignment_id"] for _ in range(3)}
    assert len(ids) == 1


def test_each_pair_goes_to_the_configured_number_of_raters(sqlite_store):
    queue_pairs(sqlite_store, 3, raters_needed=2)
    tokens = [new_rater(sqlite_store, name) for name in ("ann", "bob", "cy")]
    client = _client(sqlite_store)
    answered = {t: [] for t in tokens}
    for round_ in range(6):
        for t in tokens:
            pair = client.get("/api/next", headers=auth(t)).json()
            if not pair["done"]:
                key = f"k{round_}-{t[:8]}"
                assert _vote(client, t, pair["assignment_id"], "left", key).status_code == 200
                answered[t].append(pair["prompt"])
    assert sqlite_store.count("collect") == 6  # 3 pairs x 2 raters, no more
    for prompts in answered.values():
        assert len(prompts) == len(set(prompts))  # nobody labels a pair twice
    per_prompt = {}
    for prompts in answered.values():
        for p in prompts:
            per_prompt[p] = per_prompt.get(p, 0) + 1
    assert per_prompt == {f"a red circle {i}": 2 for i in range(3)}


def test_admin_flow_counts_agreement_and_export(sqlite_store):
    queue_pairs(sqlite_store, 2, raters_needed=2)
    ann, bob = new_rater(sqlite_store, "ann"), new_rater(sqlite_store, "bob")
    admin = new_admin(sqlite_store)
    client = _client(sqlite_store)
    # ann and bob pick the same image on the first prompt and different images on the second.
    picks = {"ann": {"0": "a", "1": "a"}, "bob": {"0": "a", "1": "b"}}
    for name, token in (("ann", ann), ("bob", bob)):
        for n in range(2):
            pair = client.get("/api/next", headers=auth(token)).json()
            left = pair["left"][-64:]
            index = pair["prompt"][-1]
            want_a = picks[name][index] == "a"
            # Which side shows image a? The store keeps images a and b as the pair's first and second.
            a_sha = _image_a(sqlite_store, pair["prompt"])
            vote = "left" if (left == a_sha) == want_a else "right"
            assert _vote(client, token, pair["assignment_id"], vote, f"{name}-key-{n}").status_code == 200
    assert client.get(f"/admin?token={admin}").status_code == 200
    data = client.get("/api/admin/overview", headers=auth(admin)).json()
    assert (data["tasks"], data["tasks_complete"], data["votes"], data["votes_needed"]) == (2, 2, 4, 4)
    assert data["agreement"] == pytest.approx(0.5)
    assert {r["name"]: r["agreement"] for r in data["raters"]} == {"ann": 0.5, "bob": 0.5}
    export = client.get("/api/admin/export", headers=auth(admin))
    assert export.status_code == 200
    table = pq.read_table(io.BytesIO(export.content))
    assert table.num_rows == 4


def _image_a(store, prompt: str) -> str:
    from sqlalchemy import select

    from diffalign.collect.models import CollectTask
    from diffalign.collect.storage import read_connection
    from diffalign.prefs.schema import Prompt

    with read_connection(store) as conn:
        return conn.execute(
            select(CollectTask.image_a)
            .join(Prompt, Prompt.id == CollectTask.prompt_id)
            .where(Prompt.text == prompt)
        ).scalar_one()


def test_pairwise_agreement_matches_a_hand_count():
    answers = [
        (1, "a", "a"), (1, "b", "a"), (1, "c", "b"),  # pairs: ab agree, ac no, bc no
        (2, "a", "tie"), (2, "b", "tie"),  # ab agree
        (3, "a", "skip"), (3, "c", "a"),  # skip: no pair
    ]  # fmt: skip
    per_rater, overall = pairwise_agreement(answers)
    assert overall == pytest.approx(2 / 4)
    assert per_rater == {"a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3), "c": 0.0}
    assert pairwise_agreement([(1, "a", "a")]) == ({"a": None}, None)


def test_the_rate_limit_answers_429_with_retry_after(sqlite_store):
    queue_pairs(sqlite_store, 1)
    token = new_rater(sqlite_store, "ann")
    client = _client(sqlite_store, rate_per_s=0.5, burst=3)
    codes = [client.get("/api/next", headers=auth(token)).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = client.get("/api/next", headers=auth(token))
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    other = new_rater(sqlite_store, "bob")
    assert client.get("/api/next", headers=auth(other)).status_code == 200  # per token
