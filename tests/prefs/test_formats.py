"""Format readers and exporters: good rows, each kind of bad row, streaming, and round trips via the store."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from diffalign.prefs.formats import (
    EXPORTS,
    FORMATS,
    ExportError,
    count_rows,
    export_format,
    read_format,
    to_hf_dataset,
)
from diffalign.prefs.formats.hpdv2 import iter_json_array
from diffalign.prefs.records import BadRow, NewComparison
from diffalign.prefs.store import ImportAborted, PreferenceStore
from tests.prefs.helpers import image_bytes

WHEN = datetime(2023, 4, 1, 9, 30, tzinfo=timezone.utc)


def drawn(seed: int, fmt: str = "PNG", size: int = 16) -> bytes:
    """A small image with a shape whose colour, place and kind depend on the seed."""
    import io

    im = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    draw = ImageDraw.Draw(im)
    x = seed % (size // 2)
    box = (x, x // 2, x + size // 2, x // 2 + size // 2)
    colour = (255 - (seed * 37) % 256, (seed * 17) % 256, 128)
    (draw.ellipse if seed % 2 else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pickapic_row(i: int, label_0: float = 1.0, label_1: float = 0.0, **overrides) -> dict:
    """Row i of a Pick-a-Pic shard: JPEG images 2i and 2i+1 (PNG for odd i), the given labels."""
    fmt = "PNG" if i % 2 else "JPEG"
    uids = [f"uid-{2 * i}", f"uid-{2 * i + 1}"]
    best = "" if label_0 == label_1 else uids[0 if label_0 > label_1 else 1]
    row = dict(
        are_different=True,
        best_image_uid=best,
        caption=f"a picture number {i % 3}",
        created_at=WHEN,
        has_label=True,
        image_0_uid=uids[0],
        image_1_uid=uids[1],
        image_0_url=f"https://example.org/{uids[0]}.jpg",
        image_1_url=f"https://example.org/{uids[1]}.jpg",
        jpg_0=drawn(2 * i, fmt),
        jpg_1=drawn(2 * i + 1, fmt),
        label_0=label_0,
        label_1=label_1,
        model_0="sd-1.5",
        model_1="sdxl",
        ranking_id=1000 + i,
        user_id=7 + i % 2,
        num_example_per_prompt=1,
    )
    row.update(overrides)
    return row


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def good_shard(path: Path) -> Path:
    """Three picks, one tie: rows 0..3."""
    rows = [pickapic_row(0), pickapic_row(1, 0.0, 1.0), pickapic_row(2, 0.5, 0.5), pickapic_row(3)]
    return write_parquet(path, rows)


def split(items) -> tuple[list[NewComparison], list[BadRow]]:
    items = list(items)
    return [i for i in items if isinstance(i, NewComparison)], [i for i in items if isinstance(i, BadRow)]


# --- Pick-a-Pic ---------------------------------------------------------------------------------


def test_pickapic_reads_picks_ties_and_metadata(tmp_path: Path) -> None:
    good, bad = split(read_format("pickapic", good_shard(tmp_path / "train-0000.parquet")))
    assert bad == []
    assert [(c.choice, c.chosen) for c in good] == [("image", 0), ("image", 1), ("tie", None), ("image", 0)]
    first = good[0]
    assert first.key == "pickapic:1000"
    assert first.rater == "pickapic:7"
    assert first.source == "pickapic"
    assert first.prompt == "a picture number 0"
    assert first.images == [drawn(0, "JPEG"), drawn(1, "JPEG")]
    assert first.created_at == WHEN
    assert first.image_meta[0] == {"uid": "uid-0", "model": "sd-1.5", "url": "https://example.org/uid-0.jpg"}
    assert first.meta["ranking_id"] == 1000 and first.meta["num_example_per_prompt"] == 1
    assert first.where == "train-0000.parquet row 0"
    assert good[3].where == "train-0000.parquet row 3"
    assert count_rows("pickapic", tmp_path / "train-0000.parquet") == 4


def test_pickapic_bad_rows_name_file_and_row(tmp_path: Path) -> None:
    rows = [
        pickapic_row(0),
        pickapic_row(1, 0.0, 0.0),  # no preference
        pickapic_row(2, 1.0, 1.0),  # inconsistent
        pickapic_row(3, jpg_1=b"\xff\xd8\xffnot really a jpeg"),  # corrupt image
        pickapic_row(4, best_image_uid="uid-9"),  # labels say image 0, best_image_uid says image 1
        pickapic_row(5, has_label=False),
        pickapic_row(6, jpg_0=None),
        pickapic_row(7),
    ]
    good, bad = split(read_format("pickapic", write_parquet(tmp_path / "shard.parquet", rows)))
    assert [c.where for c in good] == ["shard.parquet row 0", "shard.parquet row 7"]
    reasons = {b.where: b.reason for b in bad}
    assert list(reasons) == [f"shard.parquet row {i}" for i in range(1, 7)]
    assert "label_0 = label_1 = 0" in reasons["shard.parquet row 1"]
    assert "inconsistent labels" in reasons["shard.parquet row 2"]
    assert "image 1" in reasons["shard.parquet row 3"] and "decode" in reasons["shard.parquet row 3"]
    assert "best_image_uid" in reasons["shard.parquet row 4"]
    assert "has_label" in reasons["shard.parquet row 5"]
    assert "jpg_0" in reasons["shard.parquet row 6"]


def test_pickapic_missing_column_is_one_bad_row_for_the_file(tmp_path: Path) -> None:
    rows = [{k: v for k, v in pickapic_row(i).items() if k != "label_1"} for i in range(3)]
    (bad,) = read_format("pickapic", write_parquet(tmp_path / "x.parquet", rows))
    assert isinstance(bad, BadRow)
    assert bad.where == "x.parquet (all 3 rows)"
    assert "missing column 'label_1'" in bad.reason


def test_pickapic_reads_folders_and_globs_in_sorted_order(tmp_path: Path) -> None:
    shards = tmp_path / "data"
    shards.mkdir()
    write_parquet(shards / "train-0001.parquet", [pickapic_row(1)])
    write_parquet(shards / "train-0000.parquet", [pickapic_row(0)])
    (shards / "notes.txt").write_text("not a shard")
    by_folder = [c.where for c in read_format("pickapic", shards)]
    by_glob = [c.where for c in read_format("pickapic", str(shards / "train-*.parquet"))]
    assert by_folder == by_glob == ["train-0000.parquet row 0", "train-0001.parquet row 0"]
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        list(read_format("pickapic", str(shards / "test-*.parquet")))


def test_parquet_is_streamed_in_batches_never_read_whole(tmp_path: Path, monkeypatch) -> None:
    path = write_parquet(tmp_path / "big.parquet", [pickapic_row(i) for i in range(10)], row_group_size=4)
    assert pq.ParquetFile(path).num_row_groups == 3

    def forbidden(*args, **kwargs):
        raise AssertionError("a whole parquet file was read")

    monkeypatch.setattr(pq, "read_table", forbidden)
    monkeypatch.setattr(pq.ParquetFile, "read", forbidden)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", forbidden)
    batches: list[int] = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    stream = read_format("pickapic", path, batch_size=3)
    first = next(stream)
    assert first.where == "big.parquet row 0" and batches == [3]  # only the first batch was read
    rest = list(stream)
    assert [c.where for c in rest] == [f"big.parquet row {i}" for i in range(1, 10)]
    assert max(batches) <= 3 and sum(batches) == 10


def test_read_format_rejects_unknown_formats_and_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        read_format("nope", tmp_path)
    with pytest.raises(ValueError, match="inline"):
        read_format("pickapic", tmp_path, images_dir=tmp_path)
    assert set(FORMATS) == {"pickapic", "hpdv2", "imagerewarddb", "jsonl"}
    assert set(EXPORTS) == {"pickapic", "jsonl", "hf", "parquet"}


# --- ImageRewardDB ------------------------------------------------------------------------------


def test_imagerewarddb_pairs_with_struct_and_plain_image_cells(tmp_path: Path) -> None:
    structs = [
        {
            "prompt_id": "p1",
            "prompt": "a red fox",
            "classification": "Animals",
            "img_better": {"bytes": drawn(1), "path": "p1/1.webp"},
            "img_worse": {"bytes": drawn(2), "path": "p1/2.webp"},
        },
        {
            "prompt_id": "p1",
            "prompt": "a red fox",
            "classification": "Animals",
            "img_better": {"bytes": b"garbage", "path": "p1/3.webp"},
            "img_worse": {"bytes": drawn(2), "path": "p1/2.webp"},
        },
        {
            "prompt_id": "p2",
            "prompt": "a castle",
            "classification": "Places",
            "img_better": {"bytes": None, "path": "p2/1.webp"},
            "img_worse": {"bytes": drawn(4), "path": "p2/2.webp"},
        },
    ]
    write_parquet(tmp_path / "train-00000-of-00002.parquet", structs)
    plain = [{"prompt": "a boat", "img_better": drawn(5, "JPEG"), "img_worse": drawn(6, "JPEG")}]
    write_parquet(tmp_path / "train-00001-of-00002.parquet", plain)
    good, bad = split(read_format("imagerewarddb", tmp_path))
    assert [(c.prompt, c.chosen, c.source, c.rater) for c in good] == [
        ("a red fox", 0, "imagerewarddb", None),
        ("a boat", 0, "imagerewarddb", None),
    ]
    assert good[0].images == [drawn(1), drawn(2)]
    assert good[0].image_meta == [{"path": "p1/1.webp"}, {"path": "p1/2.webp"}]
    assert good[0].meta == {"prompt_id": "p1", "classification": "Animals"}
    assert [b.where for b in bad] == [
        "train-00000-of-00002.parquet row 1",
        "train-00000-of-00002.parquet row 2",
    ]
    assert "image 0" in bad[0].reason and "img_better" in bad[1].reason


def test_imagerewarddb_per_image_metadata_is_refused_with_a_hint(tmp_path: Path) -> None:
    rows = [{"image": drawn(1), "prompt_id": "p", "prompt": "x", "rank": 1}]
    (bad,) = read_format("imagerewarddb", write_parquet(tmp_path / "metadata-train.parquet", rows))
    assert "img_better" in bad.reason and "_pair" in bad.reason


# --- HPDv2 --------------------------------------------------------------------------------------


def hpd_folder(root: Path, n_images: int = 6) -> Path:
    (root / "images").mkdir(parents=True)
    for i in range(n_images):
        (root / "images" / f"{i}.png").write_bytes(drawn(i))
    return root


def test_hpdv2_train_layout(tmp_path: Path) -> None:
    root = hpd_folder(tmp_path)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    three = [f"images/{i}.png" for i in (2, 3, 4)]
    entries = [
        {"prompt": "two cats", "file_path": ["images/0.png", "images/1.png"], "human_preference": [0, 1]},
        {"prompt": "three", "file_path": three, "human_preference": [1, 0, 0]},
        {"prompt": "none", "file_path": ["images/0.png", "images/1.png"], "human_preference": [0, 0]},
        {"prompt": "both", "file_path": ["images/0.png", "images/1.png"], "human_preference": [1, 1]},
        {"prompt": "gone", "file_path": ["images/0.png", "images/missing.png"], "human_preference": [1, 0]},
        {"prompt": "broken", "file_path": ["images/broken.png", "images/1.png"], "human_preference": [1, 0]},
        {"prompt": "short", "file_path": ["images/0.png"], "human_preference": [1, 0]},
    ]  # fmt: skip
    (root / "train.json").write_text(json.dumps(entries))
    good, bad = split(read_format("hpdv2", root / "train.json"))
    assert [(c.prompt, len(c.images), c.chosen) for c in good] == [("two cats", 2, 1), ("three", 3, 0)]
    assert good[0].images == [drawn(0), drawn(1)] and good[0].source == "hpdv2"
    assert good[0].where == "train.json entry 0"
    reasons = {b.where: b.reason for b in bad}
    assert list(reasons) == [f"train.json entry {i}" for i in range(2, 7)]
    assert (
        "exactly one 1" in reasons["train.json entry 2"] and "exactly one 1" in reasons["train.json entry 3"]
    )
    assert (
        "images/missing.png" in reasons["train.json entry 4"] and "not found" in reasons["train.json entry 4"]
    )
    assert "decode" in reasons["train.json entry 5"]
    assert "list of 1 integers" in reasons["train.json entry 6"]


def test_hpdv2_images_option_and_test_layout_expands_each_ranking(tmp_path: Path) -> None:
    images = hpd_folder(tmp_path / "data")
    meta = tmp_path / "meta"
    meta.mkdir()
    entries = [
        {
            "prompt": "a lighthouse",
            "image_path": ["images/0.png", "images/1.png", "images/2.png"],
            "rank": [1, 2, 3],
            "raw_annotations": [
                {"rank": [1, 2, 3], "user_hash": "u1"},
                {"rank": [2, 2, 1], "user_hash": "u2"},
                {"rank": [1, 2], "user_hash": "u3"},
            ],
        },
        {"prompt": "no raters", "image_path": ["images/3.png", "images/4.png"], "rank": [2, 1]},
    ]
    (meta / "test.json").write_text(json.dumps(entries, indent=2))
    good, bad = split(read_format("hpdv2", meta / "test.json", images_dir=images))
    assert [b.where for b in bad] == ["test.json entry 0 annotation 2"]
    u1 = [(c.images, c.choice, c.chosen) for c in good if c.rater == "hpdv2:u1"]
    assert u1 == [
        ([drawn(0), drawn(1)], "image", 0),
        ([drawn(0), drawn(2)], "image", 0),
        ([drawn(1), drawn(2)], "image", 0),
    ]
    u2 = [(c.choice, c.chosen, c.meta["positions"]) for c in good if c.rater == "hpdv2:u2"]
    assert u2 == [("tie", None, [0, 1]), ("image", 1, [0, 2]), ("image", 1, [1, 2])]
    (aggregate,) = [c for c in good if c.rater is None]
    assert (aggregate.prompt, aggregate.chosen, aggregate.meta["aggregated"]) == ("no raters", 1, True)
    assert good[0].where == "test.json entry 0 annotation 0 pair (0, 1)"


def test_json_array_is_parsed_incrementally(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    values = [{"prompt": "x" * (i * 7), "n": i} for i in range(40)]
    path.write_text(json.dumps(values, indent=1))
    assert list(iter_json_array(path, chunk_size=16)) == values
    path.write_text('[ 12345 , [1, 2] ,\n"s" ]')
    assert list(iter_json_array(path, chunk_size=2)) == [12345, [1, 2], "s"]
    path.write_text("[]")
    assert list(iter_json_array(path, chunk_size=1)) == []
    path.write_text('[{"a": 1}, {"a": oops}]')
    stream = iter_json_array(path, chunk_size=4)
    assert next(stream) == {"a": 1}
    with pytest.raises(ValueError, match=r"a\.json entry 1: not valid JSON"):
        next(stream)


def test_hpdv2_malformed_json_stops_with_a_bad_row(tmp_path: Path) -> None:
    root = hpd_folder(tmp_path)
    good_entry = {"prompt": "ok", "file_path": ["images/0.png", "images/1.png"], "human_preference": [1, 0]}
    (root / "train.json").write_text("[" + json.dumps(good_entry) + ", {oops}]")
    good, bad = split(read_format("hpdv2", root / "train.json"))
    assert len(good) == 1
    assert [b.where for b in bad] == ["train.json entry 1"]


# --- our JSONL ----------------------------------------------------------------------------------


def test_jsonl_good_and_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(drawn(i))
    ok = {"prompt": "p", "images": ["img/0.png", "img/1.png"], "choice": "image", "chosen": 1}
    lines = [
        json.dumps({**ok, "rater": "ann", "rater_group": "g1", "source": "collect", "key": "k1",
                    "created_at": "2023-04-01T09:30:00Z", "meta": {"session": 3}}),
        "",
        "{not json",
        json.dumps({k: v for k, v in ok.items() if k != "choice"}),
        json.dumps({**ok, "chosen": "1"}),
        json.dumps({**ok, "images": ["img/0.png", "img/nope.png"]}),
        json.dumps({**ok, "chosen": 2}),
        json.dumps({"prompt": "p3", "images": ["img/0.png", "img/1.png", "img/2.png"], "choice": "skip"}),
        json.dumps({**ok, "created_at": "yesterday"}),
        json.dumps([1, 2]),
    ]  # fmt: skip
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    good, bad = split(read_format("jsonl", tmp_path / "c.jsonl"))
    assert [(c.where, c.choice, c.chosen, c.source) for c in good] == [
        ("c.jsonl line 1", "image", 1, "collect"),
        ("c.jsonl line 8", "skip", None, "local"),
    ]
    first = good[0]
    assert (first.rater, first.rater_group, first.key, first.meta) == ("ann", "g1", "k1", {"session": 3})
    assert first.created_at == WHEN and first.images == [drawn(0), drawn(1)]
    reasons = {b.where: b.reason for b in bad}
    assert list(reasons) == [f"c.jsonl line {n}" for n in (3, 4, 5, 6, 7, 9, 10)]
    assert "not valid JSON" in reasons["c.jsonl line 3"]
    assert "missing field 'choice'" in reasons["c.jsonl line 4"]
    assert "'chosen' must be an integer" in reasons["c.jsonl line 5"]
    assert "img/nope.png" in reasons["c.jsonl line 6"] and "not found" in reasons["c.jsonl line 6"]
    assert "chosen must index one of the 2 images, got 2" in reasons["c.jsonl line 7"]
    assert "ISO 8601" in reasons["c.jsonl line 9"]
    assert "JSON object" in reasons["c.jsonl line 10"]
    # --source overrides, --images moves the base folder
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.jsonl").write_text(lines[0] + "\n")
    (only,) = read_format("jsonl", tmp_path / "elsewhere" / "c.jsonl", images_dir=tmp_path, source="mine")
    assert only.source == "mine" and only.images == [drawn(0), drawn(1)]


# --- with the store: round trips, atomicity -----------------------------------------------------


def content(store: PreferenceStore) -> set[tuple]:
    """What must survive a round trip, one tuple per comparison."""
    return {
        (c.key, c.prompt, tuple(c.image_hashes), c.choice, c.chosen, c.rater, c.rater_group, c.source)
        for c in store.comparisons()
    }


def snapshot(store: PreferenceStore) -> tuple:
    """Everything a write could change: the comparisons with their metadata, and the image files."""
    rows = sorted(
        (c.key, c.prompt, tuple(c.image_hashes), c.choice, c.chosen, c.rater, c.source,
         json.dumps(c.meta, sort_keys=True), c.created_at.isoformat())
        for c in store.comparisons()
    )  # fmt: skip
    files = sorted(str(p.relative_to(store.images_dir)) for p in store.images_dir.rglob("*"))
    return rows, store.stats(), files


def new_store(root: Path, name: str) -> PreferenceStore:
    return PreferenceStore.open(root / f"{name}.db")


def mixed_store(tmp_path: Path) -> PreferenceStore:
    """A store with Pick-a-Pic picks and a tie, and our own comparisons: a 3-image pick, a skip, a rater
    group, a PNG next to JPEGs."""
    store = new_store(tmp_path, "mixed")
    store.add(read_format("pickapic", good_shard(tmp_path / "shard.parquet")))
    extra = [
        NewComparison("three", [drawn(20), drawn(21), drawn(22)], "image", 2, rater="ann", rater_group="g",
                      source="collect", meta={"session": 1}),
        NewComparison("skipped", [drawn(23), drawn(24)], "skip", rater="bob", source="collect"),
        NewComparison("png pair", [drawn(25), image_bytes(26, fmt="JPEG")], "image", 1, rater="ann",
                      rater_group="g", source="collect", created_at=WHEN),
    ]  # fmt: skip
    store.add(extra)
    return store


def pickapic_only_store(tmp_path: Path, name: str = "a") -> PreferenceStore:
    store = new_store(tmp_path, name)
    store.add(read_format("pickapic", good_shard(tmp_path / f"{name}.parquet")))
    store.add(
        [NewComparison("ours", [drawn(30), drawn(31)], "tie", rater="cy", rater_group="g2", source="collect")]
    )
    return store


def test_pickapic_export_round_trip(tmp_path: Path) -> None:
    a = pickapic_only_store(tmp_path)
    out = tmp_path / "export" / "pickapic.parquet"
    report = export_format("pickapic", a, out)
    assert (report.rows, report.comparisons) == (5, 5)
    table = pq.read_table(out)
    assert {"jpg_0", "jpg_1", "label_0", "label_1", "caption", "user_id", "diffalign_key"} <= set(
        table.column_names
    )
    assert table.column("user_id").to_pylist()[:2] == ["7", "8"]  # the 'pickapic:' prefix is dropped
    assert table.column("diffalign_rater").to_pylist()[:2] == ["pickapic:7", "pickapic:8"]
    # into a fresh store: the same comparisons, byte-identical images
    b = new_store(tmp_path, "b")
    b_report = b.add(read_format("pickapic", out))
    assert b_report.added == 5
    assert content(b) == content(a)
    assert {c.key: (c.meta, c.image_meta, c.created_at) for c in b.comparisons()} == {
        c.key: (c.meta, c.image_meta, c.created_at) for c in a.comparisons()
    }
    # into the same store: nothing new
    before = snapshot(a)
    again = a.add(read_format("pickapic", out))
    assert (again.added, again.duplicates) == (0, 5)
    assert snapshot(a) == before


def test_pairs_only_exports_refuse_or_expand(tmp_path: Path) -> None:
    store = mixed_store(tmp_path)
    out = tmp_path / "p.parquet"
    with pytest.raises(ExportError, match="3 images"):
        export_format("pickapic", store, out)
    assert not out.exists() and list(tmp_path.glob(".p.parquet*")) == []  # nothing half-written
    report = export_format("pickapic", store, out, expand=True)
    assert (report.comparisons, report.rows, report.expanded) == (7, 4 + 2 + 1, 1)
    assert dict(report.left_out) == {"skipped comparisons": 1}
    rows = pq.read_table(out, columns=["caption", "label_0", "label_1", "diffalign_key"]).to_pylist()
    three = [r for r in rows if r["caption"] == "three"]
    assert [(r["label_0"], r["label_1"]) for r in three] == [(0.0, 1.0), (0.0, 1.0)]
    assert all(r["diffalign_key"].endswith(("#0-2", "#1-2")) for r in three)


def test_jsonl_export_round_trip_keeps_every_comparison(tmp_path: Path) -> None:
    store = mixed_store(tmp_path)
    report = export_format("jsonl", store, tmp_path / "out")
    assert report.rows == report.comparisons == 7
    lines = (tmp_path / "out" / "comparisons.jsonl").read_text().splitlines()
    assert json.loads(lines[4])["images"][0].startswith("images/")
    assert {p.suffix for p in (tmp_path / "out" / "images").iterdir()} == {".jpg", ".png"}
    fresh = new_store(tmp_path, "fresh")
    assert fresh.add(read_format("jsonl", tmp_path / "out")).added == 7
    assert content(fresh) == content(store)
    # exporting again into the same folder is fine, and the store adds nothing on re-import
    export_format("jsonl", store, tmp_path / "out")
    assert store.add(read_format("jsonl", tmp_path / "out")).added == 0


def test_plain_parquet_export(tmp_path: Path) -> None:
    store = mixed_store(tmp_path)
    report = export_format("parquet", store, tmp_path / "all.parquet")
    assert report.rows == 7
    rows = pq.read_table(tmp_path / "all.parquet").to_pylist()
    by_key = {c.key: c for c in store.comparisons()}
    for row in rows:
        stored = by_key[row["key"]]
        assert [sha(b) for b in row["images"]] == row["image_sha256"] == stored.image_hashes
        assert (row["choice"], row["chosen"], row["rater"]) == (stored.choice, stored.chosen, stored.rater)
        assert json.loads(row["meta"]) == stored.meta


def test_hf_dataset_export_round_trip(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    store = pickapic_only_store(tmp_path)
    export_format("hf", store, tmp_path / "hf")
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(loaded) == 5
    assert isinstance(loaded.features["image_0"], datasets.Image)
    raw = loaded.cast_column("image_0", datasets.Image(decode=False)).cast_column(
        "image_1", datasets.Image(decode=False)
    )
    by_key = {c.key: c for c in store.comparisons()}
    for row in raw:
        stored = by_key[row["key"]]
        assert [sha(row["image_0"]["bytes"]), sha(row["image_1"]["bytes"])] == stored.image_hashes
        label = {("image", 0): (1.0, 0.0), ("image", 1): (0.0, 1.0), ("tie", None): (0.5, 0.5)}
        assert (row["label_0"], row["label_1"]) == label[(stored.choice, stored.chosen)]
        assert (row["prompt"], row["rater"], row["source"]) == (stored.prompt, stored.rater, stored.source)
    decoded = loaded[0]["image_0"]
    assert isinstance(decoded, Image.Image) and decoded.size == (16, 16)
    ds = to_hf_dataset(store, tmp_path / "cache", source="collect")
    assert len(ds) == 1 and ds[0]["label_0"] == 0.5
    with pytest.raises(ExportError, match="exists"):
        export_format("hf", store, tmp_path / "hf")


def test_corrupt_image_mid_file_aborts_and_leaves_the_store_unchanged(tmp_path: Path) -> None:
    store = pickapic_only_store(tmp_path)
    before = snapshot(store)
    rows = [pickapic_row(i) for i in range(10, 14)]
    rows[2]["jpg_0"] = drawn(99)[:40]  # truncated in the middle of the file
    path = write_parquet(tmp_path / "more.parquet", rows)
    with pytest.raises(ImportAborted) as err:
        store.add(read_format("pickapic", path))
    assert "more.parquet row 2" in str(err.value)
    assert snapshot(store) == before
    report = store.add(read_format("pickapic", path), skip_bad=True)
    assert report.added == 3 and [b.where for b in report.skipped] == ["more.parquet row 2"]
