"""The preference store: transactions, idempotency, content addressing, pairs, several writers at once."""

from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, inspect, text

from diffalign.prefs.records import BadRow, NewComparison
from diffalign.prefs.store import ImportAborted, PreferenceStore, StoreError
from tests.prefs.helpers import comparison, image_bytes


def snapshot(store: PreferenceStore) -> tuple:
    """Every row of every table, and every file under the images folder (with its bytes' hash)."""
    engine = create_engine(store.url)
    with engine.connect() as conn:
        tables = sorted(inspect(conn).get_table_names())
        rows = {t: sorted(map(repr, conn.execute(text(f'select * from "{t}"')))) for t in tables}
    engine.dispose()
    files = sorted(
        (str(p.relative_to(store.images_dir)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in store.images_dir.rglob("*")
        if p.is_file()
    )
    return rows, files


def test_add_reads_back_everything(store: PreferenceStore) -> None:
    when = datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)
    item = comparison(
        1, created_at=when, meta={"model_0": "sd15", "ranking_id": 7}, image_meta=[{"uid": "a"}, {"uid": "b"}]
    )
    report = store.add([item])
    assert (report.added, report.duplicates, report.new_images, report.skipped) == (1, 0, 2, [])
    (stored,) = list(store.comparisons())
    assert stored.prompt == item.prompt
    assert stored.image_hashes == [hashlib.sha256(b).hexdigest() for b in item.images]
    assert (stored.choice, stored.chosen, stored.rater, stored.rater_group) == ("image", 1, "rater1", "warm")
    assert stored.created_at == when
    assert stored.meta == {"model_0": "sd15", "ranking_id": 7}
    assert stored.image_meta == [{"uid": "a"}, {"uid": "b"}]
    for sha, data in zip(stored.image_hashes, item.images):
        assert store.image_bytes(sha) == data  # stored as given, never re-encoded
        info = store.image_info(sha)
        assert (info.format, info.width, info.height, info.size_bytes) == ("PNG", 16, 16, len(data))
        assert info.path.name.startswith(sha) and info.path.is_file()


def test_importing_twice_adds_nothing(store: PreferenceStore) -> None:
    items = [comparison(i) for i in range(20)]
    first = store.add(items)
    before = snapshot(store)
    second = store.add(items)
    assert (first.added, second.added, second.duplicates, second.new_images) == (20, 0, 20, 0)
    assert snapshot(store) == before


def test_explicit_keys_are_idempotency_keys(store: PreferenceStore) -> None:
    store.add([comparison(0, key="vote-1")])
    # A retry of the same vote, even with another choice recorded, is the same comparison.
    report = store.add([comparison(0, key="vote-1", chosen=1)])
    assert (report.added, report.duplicates) == (0, 1)
    assert store.count() == 1


def test_shared_images_and_prompts_are_stored_once(store: PreferenceStore) -> None:
    shared = image_bytes(1000)
    items = [comparison(i, images=[shared, image_bytes(i)], prompt="the same") for i in range(5)]
    store.add(items)
    stats = store.stats()
    assert (stats["comparisons"], stats["images"], stats["prompts"]) == (5, 6, 1)


def test_corrupt_image_aborts_and_leaves_the_store_unchanged(store: PreferenceStore) -> None:
    store.add([comparison(i) for i in range(3)])
    before = snapshot(store)
    good = [comparison(i) for i in range(10, 15)]
    corrupt = comparison(15, images=[image_bytes(77), image_bytes(78)[:40]], where="pairs.parquet row 5")
    with pytest.raises(ImportAborted) as err:
        store.add([*good, corrupt, comparison(16)])
    assert "pairs.parquet row 5" in str(err.value) and "image 1" in str(err.value)
    assert err.value.where == "pairs.parquet row 5"
    assert snapshot(store) == before
    assert not (store.images_dir / ".staging").exists()


def test_bad_row_from_a_reader_aborts(store: PreferenceStore) -> None:
    with pytest.raises(ImportAborted, match=r"train\.json entry 3: label_0 and label_1 are both 0"):
        store.add([comparison(0), BadRow("train.json entry 3", "label_0 and label_1 are both 0")])
    assert store.count() == 0
    assert [p for p in store.images_dir.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"images": [image_bytes(1)]}, "at least two images"),
        ({"choice": "left"}, "choice must be one of"),
        ({"chosen": 2}, "chosen must index one of the 2 images"),
        ({"choice": "tie", "chosen": 0}, "cannot name a chosen image"),
        ({"meta": {"when": object()}}, "meta is not JSON"),
        ({"images": [image_bytes(1), b""]}, "image 1: image is empty"),
        ({"images": [image_bytes(1), b"not an image at all"]}, "image 1: not an image file"),
    ],
)
def test_invalid_comparisons_are_named(store: PreferenceStore, overrides: dict, message: str) -> None:
    with pytest.raises(ImportAborted, match=message):
        store.add([comparison(0, **overrides)])
    assert store.count() == 0


def test_skip_bad_skips_reports_and_keeps_the_rest(store: PreferenceStore) -> None:
    items = [
        comparison(0),
        # This row writes its prompt, rater and first image before its second image fails:
        # the savepoint must take all of that back, and the next rows reuse nothing of it.
        comparison(1, prompt="only in the bad row", rater="bad-rater", images=[image_bytes(500), b"junk"]),
        BadRow("file.parquet row 2", "missing column caption"),
        comparison(
            3, prompt="only in the bad row", rater="bad-rater", images=[image_bytes(500), image_bytes(501)]
        ),
    ]
    report = store.add(items, skip_bad=True)
    assert report.added == 2
    assert [b.where for b in report.skipped] == ["row 1", "file.parquet row 2"]
    assert "image 1" in report.skipped[0].reason
    stats = store.stats()
    assert (stats["comparisons"], stats["images"], stats["prompts"]) == (2, 4, 2)
    files = [p for p in store.images_dir.rglob("*") if p.is_file()]
    assert len(files) == 4


def test_pairs_expand_winners_ties_and_skips(store: PreferenceStore) -> None:
    imgs = [image_bytes(i) for i in range(4)]
    store.add(
        [
            NewComparison("two, second wins", imgs[:2], "image", chosen=1, rater="r", rater_group="g"),
            NewComparison("three, middle wins", imgs[:3], "image", chosen=1),
            NewComparison("a tie", imgs[2:4], "tie"),
            NewComparison("skipped", imgs[:2], "skip"),
        ]
    )
    pairs = store.pairs()
    assert pairs.prompts == ["two, second wins", "three, middle wins", "three, middle wins", "a tie"]
    assert pairs.prob_a.tolist() == [0.0, 0.0, 1.0, 0.5]
    assert pairs.raters == ["r", None, None, None] and pairs.groups == ["g", None, None, None]

    def pixels(i: int) -> torch.Tensor:
        return torch.from_numpy(store.load_image(hashlib.sha256(imgs[i]).hexdigest())).permute(2, 0, 1)

    # (0 vs 1, 1 wins), then the three-image comparison as (0, 1) and (1, 2), then the tie (2, 3).
    expected_a, expected_b = [0, 0, 1, 2], [1, 1, 2, 3]
    for row, (a, b) in enumerate(zip(expected_a, expected_b)):
        assert torch.equal(pairs.images_a[row], pixels(a)) and torch.equal(pairs.images_b[row], pixels(b))
    assert len(store.pairs(include_ties=False)) == 3


def test_pairs_resize_and_refuse_mixed_sizes(store: PreferenceStore) -> None:
    store.add([NewComparison("p", [image_bytes(1, size=16), image_bytes(2, size=24)], "image", chosen=0)])
    with pytest.raises(StoreError, match="differ in size"):
        store.pairs()
    assert store.pairs(size=8).images_a.shape == (1, 3, 8, 8)


def test_pairs_of_an_empty_store_is_a_clear_error(store: PreferenceStore) -> None:
    with pytest.raises(StoreError, match="no labelled pairs"):
        store.pairs()
    store.add([NewComparison("p", [image_bytes(1), image_bytes(2)], "tie")])
    with pytest.raises(StoreError, match=r"no labelled pairs \(ties left out\)"):
        store.pairs(include_ties=False)


def test_jpeg_and_png_keep_their_format(store: PreferenceStore) -> None:
    jpeg = image_bytes(3, fmt="JPEG")
    store.add([NewComparison("p", [jpeg, image_bytes(4)], "image", chosen=0)])
    sha = hashlib.sha256(jpeg).hexdigest()
    assert store.image_info(sha).format == "JPEG" and store.image_path(sha).suffix == ".jpg"
    assert store.image_bytes(sha) == jpeg


def test_a_file_changed_on_disk_is_detected(store: PreferenceStore) -> None:
    data = image_bytes(5)
    store.add([NewComparison("p", [data, image_bytes(6)], "image", chosen=0)])
    sha = hashlib.sha256(data).hexdigest()
    store.image_path(sha).write_bytes(image_bytes(7))
    with pytest.raises(StoreError, match="does not match its hash"):
        store.image_bytes(sha)


def test_comparisons_stream_in_pages(store: PreferenceStore) -> None:
    store.add([comparison(i, source="a" if i % 2 else "b") for i in range(25)])
    assert [c.key for c in store.comparisons(batch_size=4)] == [c.key for c in store.comparisons()]
    assert len(list(store.comparisons(source="a", batch_size=3))) == 12
    assert store.count("b") == 13


def test_open_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a folder"):
        PreferenceStore.open(tmp_path)
    with pytest.raises(StoreError, match="no preference store at"):
        PreferenceStore.open(tmp_path / "missing.db", create=False)
    with pytest.raises(StoreError, match="needs images_dir"):
        PreferenceStore.open("postgresql://user:secret@localhost/prefs")
    foreign = tmp_path / "other.db"
    sqlite3.connect(foreign).execute(
        "create table store_meta (key text primary key, value text)"
    ).connection.commit()
    with pytest.raises(StoreError, match="not a diffalign preference store"):
        PreferenceStore.open(foreign, create=False)


def test_sqlite_store_uses_wal(tmp_path: Path) -> None:
    store = PreferenceStore.open(tmp_path / "prefs.db")
    database = store.url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as conn:
        assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"


def _writer(location: str, images: Path, worker: int, n: int, shared: int) -> None:
    """One process: its own n comparisons, then `shared` comparisons every worker also writes."""
    with PreferenceStore.open(location, images_dir=images) as store:
        for i in range(n):
            store.add([comparison(1000 * (worker + 1) + i, key=f"w{worker}-{i}")])
        for i in range(shared):
            store.add([comparison(i, key=f"shared-{i}", prompt="shared prompt", rater="shared rater")])


def test_several_processes_write_at_once_without_loss_or_duplicates(store_location: tuple[str, Path]) -> None:
    location, images = store_location
    PreferenceStore.open(location, images_dir=images).close()
    workers, n, shared = 4, 25, 10
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_writer, args=(location, images, w, n, shared)) for w in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)
        assert process.exitcode == 0
    with PreferenceStore.open(location, images_dir=images) as store:
        keys = [c.key for c in store.comparisons()]
        assert len(keys) == len(set(keys)) == workers * n + shared
        assert all(len(c.image_hashes) == 2 for c in store.comparisons())
        stats = store.stats()
        assert stats["images"] == 2 * (workers * n + shared)
        files = [p for p in store.images_dir.rglob("*") if p.is_file()]
        assert len(files) == stats["images"]
        for c in store.comparisons():
            for sha in c.image_hashes:
                assert store.image_bytes(sha)  # every referenced file is there and intact
        assert np.isfinite(store.pairs().prob_a.numpy()).all()
