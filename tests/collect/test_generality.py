"""Inputs off the happy path: odd vote bodies, odd pairs, odd names and prompt files, a damaged store."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

import diffalign.prefs.formats as formats
from diffalign.cli import app as cli_app
from diffalign.collect.app import ServerConfig, create_app
from diffalign.collect.limits import RateLimiter
from diffalign.collect.models import CollectTask
from diffalign.collect.queue import PairTask, add_pairs
from diffalign.collect.storage import open_store, read_connection, write_transaction
from diffalign.collect.tasks import read_prompts
from diffalign.collect.tokens import TokenError, add_rater, resolve
from diffalign.prefs.store import StoreError
from tests.collect.conftest import auth, new_admin, new_rater, png, queue_pairs


@pytest.fixture
def rater(sqlite_store):
    """A store with two pairs, rater ann holding the first, and a client that shows 500s as responses."""
    queue_pairs(sqlite_store, 2)
    token = new_rater(sqlite_store, "ann")
    client = TestClient(create_app(sqlite_store, ServerConfig()), raise_server_exceptions=False)
    pair = client.get("/api/next", headers=auth(token)).json()
    return sqlite_store, client, token, pair


def _tasks(store) -> int:
    with read_connection(store) as conn:
        return conn.execute(select(func.count(CollectTask.id))).scalar_one()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"assignment_id": 9223372036854775808, "vote": "left", "idempotency_key": "abcdefgh"}',  # 2**63
        b'{"assignment_id": 1000000000000000000000000000000, "vote": "left", "idempotency_key": "abcdefgh"}',
        b'{"assignment_id": 2147483648, "vote": "left", "idempotency_key": "abcdefgh"}',  # past PG's INTEGER
        b'{"assignment_id": NaN, "vote": "left", "idempotency_key": "abcdefgh"}',
        b'{"assignment_id": 1, "vote": Infinity, "idempotency_key": "abcdefgh"}',
        b'{"assignment_id": "1", "vote": "left", "idempotency_key": "abcdefgh"}',
        b'{"assignment_id": true, "vote": "left", "idempotency_key": "abcdefgh"}',
    ],
)
def test_ids_that_are_not_small_positive_integers_are_422_not_500(rater, raw):
    store, client, token, _ = rater
    answer = client.post(
        "/api/vote", content=raw, headers={**auth(token), "Content-Type": "application/json"}
    )
    assert answer.status_code == 422, answer.text
    assert all(set(error) == {"type", "loc", "msg"} for error in answer.json()["detail"])  # no input echoed
    assert store.count("collect") == 0


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_vote_not_sent_as_json_is_415_naming_the_content_type(rater, content_type):
    store, client, token, pair = rater
    body = json.dumps({"assignment_id": pair["assignment_id"], "vote": "left", "idempotency_key": "abcdefgh"})
    headers = auth(token) | ({"Content-Type": content_type} if content_type else {})
    answer = client.post("/api/vote", content=body, headers=headers)
    assert answer.status_code == 415 and "application/json" in answer.json()["detail"]
    assert client.post("/api/vote", content=body).status_code == 401  # the token is still checked first
    ok = client.post(
        "/api/vote", content=body, headers={**auth(token), "Content-Type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 200 and store.count("collect") == 1


def test_the_same_key_with_another_vote_is_a_conflict_not_a_duplicate(rater):
    store, client, token, pair = rater
    body = {"assignment_id": pair["assignment_id"], "vote": "left", "idempotency_key": "click-0001"}
    assert client.post("/api/vote", json=body, headers=auth(token)).json() == {"status": "recorded"}
    assert client.post("/api/vote", json=body, headers=auth(token)).json() == {"status": "duplicate"}
    changed = client.post("/api/vote", json={**body, "vote": "right"}, headers=auth(token))
    assert changed.status_code == 409 and "another vote" in changed.json()["detail"]
    [stored] = store.comparisons(source="collect")
    assert (stored.choice, stored.chosen) == ("image", 0)


def test_a_missing_image_file_is_a_json_500_without_server_paths(rater):
    store, client, token, pair = rater
    path = store.image_path(pair["left"][-64:])
    path.unlink()
    for answer in (
        client.get(pair["left"], headers=auth(token)),
        client.post(
            "/api/vote",
            json={"assignment_id": pair["assignment_id"], "vote": "left", "idempotency_key": "abcdefgh"},
            headers=auth(token),
        ),
    ):
        assert answer.status_code == 500 and answer.headers["content-type"] == "application/json"
        assert "image file" in answer.json()["detail"] and str(path.parent) not in answer.text
    assert store.count("collect") == 0


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (PairTask("p", png(1), png(2), priority=float("nan")), "finite"),
        (PairTask("p", png(1), png(2), priority=float("inf")), "finite"),
        (PairTask("p", png(1), png(2), priority="high"), "number"),
        (PairTask("p", png(1), png(2), meta={"x": float("nan")}), "not JSON"),
        (PairTask("p", png(1), png(2), meta={"x": object()}), "not JSON"),
        (PairTask(7, png(1), png(2)), "text"),  # type: ignore[arg-type]
        (PairTask("a\x00b", png(1), png(2)), "NUL"),
    ],
)
def test_pairs_a_vote_could_not_store_are_refused_when_queued(sqlite_store, pair, message):
    with pytest.raises(ValueError, match=message):
        add_pairs(sqlite_store, [PairTask("fine", png(3), png(4)), pair], 1, batch="b")
    assert _tasks(sqlite_store) == 0  # nothing of the call was kept


def test_the_same_pair_in_the_other_order_is_not_queued_again(sqlite_store):
    assert add_pairs(sqlite_store, [PairTask("p", png(1), png(2))], 1, batch="b") == 1
    assert add_pairs(sqlite_store, [PairTask("p", png(2), png(1))], 1, batch="b") == 0
    assert add_pairs(sqlite_store, [PairTask("p", png(2), png(1))], 1, batch="other") == 1  # per batch
    with pytest.raises(ValueError, match="batch name"):
        add_pairs(sqlite_store, [PairTask("p", png(1), png(3))], 1, batch="x" * 101)
    assert _tasks(sqlite_store) == 2


@pytest.mark.parametrize("group", ["", " g", "g\n", "a\nb", "g" * 101])
def test_a_rater_group_must_be_printable_and_fit_its_column(sqlite_store, group):
    with pytest.raises(TokenError, match="group"), write_transaction(sqlite_store) as (conn, _):
        add_rater(conn, "ann", group)
    assert new_rater(sqlite_store, "ann", group="g" * 100)  # the longest that fits


def test_cli_prints_a_rater_name_with_brackets_verbatim_and_the_token_works(tmp_path: Path):
    store = tmp_path / "prefs.db"
    result = CliRunner().invoke(cli_app, ["collect", "add-rater", "x[/bold]", "--store", str(store)])
    assert result.exit_code == 0, repr(result.exception)
    assert "'x[/bold]'" in result.output
    token = result.stdout.strip().splitlines()[-1]
    opened = open_store(store)
    try:
        with read_connection(opened) as conn:
            assert resolve(conn, token).rater_name == "x[/bold]"
    finally:
        opened.close()


def test_cli_add_tasks_refuses_a_batch_name_too_long_before_sampling(tmp_path: Path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    args = [
        "collect",
        "add-tasks",
        "--prompts",
        str(prompts),
        "--batch",
        "b" * 101,
        "--model",
        "no-such-model",
    ]
    result = CliRunner().invoke(cli_app, [*args, "--store", str(tmp_path / "prefs.db")])
    assert result.exit_code == 2 and "--batch" in result.output


def test_the_rate_limiter_forgets_full_buckets_so_made_up_tokens_cannot_fill_memory():
    limiter = RateLimiter(rate=1e9, burst=2, max_keys=50)  # every bucket is full again within a nanosecond
    for n in range(2000):
        assert limiter.allow(f"made-up-{n}") == 0.0
    assert len(limiter._buckets) <= 50
    slow = RateLimiter(rate=1e-9, burst=1, max_keys=50)  # nothing refills: a flood keeps the latest half
    for n in range(2000):
        slow.allow(f"made-up-{n}")
    assert len(slow._buckets) <= 50 and "made-up-1999" in slow._buckets
    assert slow.allow("made-up-1999") > 0  # a recent key is still limited


def test_read_prompts_drops_a_byte_order_mark_and_splits_only_at_newlines(tmp_path: Path):
    text = tmp_path / "p.txt"
    text.write_bytes("# made in Notepad\r\nun chat \u2028 sur un toit 🐱\r\n".encode("utf-8-sig"))
    assert read_prompts(text) == ["un chat \u2028 sur un toit 🐱"]
    jsonl = tmp_path / "P.JSONL"  # json.dumps(ensure_ascii=False) leaves U+2028 and U+0085 unescaped
    jsonl.write_text(json.dumps({"prompt": "a\u2028b\x85c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_prompts(jsonl) == ["a\u2028b\x85c"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts(latin)
    jsonl.write_text('{"prompt": "a\\u0000b"}\n')
    with pytest.raises(ValueError, match="NUL"):
        read_prompts(jsonl)


def test_a_failed_export_is_a_json_500_and_leaves_no_temporary_folder(sqlite_store, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise StoreError("image file /srv/secret/x.png is missing")

    monkeypatch.setattr(formats, "export_format", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    client = TestClient(create_app(sqlite_store), raise_server_exceptions=False)
    answer = client.get("/api/admin/export", headers=auth(new_admin(sqlite_store)))
    assert answer.status_code == 500 and "/srv/secret" not in answer.text
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_long_model_path_still_gives_a_default_batch_that_fits(sqlite_store, tmp_path: Path):
    from diffalign.cli.collect import default_batch

    model = str(tmp_path / ("runs/" * 30) / "dpo-final")
    batch = default_batch(model)
    assert len(batch) == 100 and batch.endswith("runs/dpo-final") and default_batch("base") == "base"
    assert add_pairs(sqlite_store, [PairTask("p", png(1), png(2))], 1, batch=batch) == 1
