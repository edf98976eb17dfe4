"""Inputs nobody wrote for us: images saved by other programs and malformed or unusual dataset files."""

from __future__ import annotations

import hashlib
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.prefs.formats import ExportError, export_format, read_format
from diffalign.prefs.formats.hpdv2 import iter_json_array
from diffalign.prefs.records import NewComparison
from diffalign.prefs.store import ImportAborted, PreferenceStore
from tests.prefs.test_formats import drawn, pickapic_row, split, write_parquet


def encoded(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def stored(store: PreferenceStore, data: bytes) -> str:
    """Add `data` in a tie against a plain image; returns its hash."""
    store.add([NewComparison(f"p {len(data)}", [data, drawn(1)], "tie", where="w")])
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path):
    with PreferenceStore.open(tmp_path / "prefs.db") as opened:
        yield opened


# --- images from other programs -----------------------------------------------------------------


def test_16_bit_grey_is_scaled_not_clipped_to_white(store: PreferenceStore) -> None:
    grey = np.full((6, 8), 128 * 257, dtype=np.uint16)  # mid grey at 16 bits
    for fmt in ("PNG", "TIFF"):
        data = encoded(Image.fromarray(grey), fmt)
        assert Image.open(io.BytesIO(data)).mode == "I;16"
        pixels = store.load_image(stored(store, data))
        assert pixels.shape == (6, 8, 3) and np.all(pixels == 128), fmt


def test_exif_orientation_is_applied_and_the_size_is_the_displayed_one(store: PreferenceStore) -> None:
    im = Image.new("RGB", (30, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: 20 wide, 30 high
    sha = stored(store, encoded(im, "JPEG", exif=exif.tobytes()))
    info = store.image_info(sha)
    assert (info.format, info.width, info.height) == ("JPEG", 20, 30)
    assert store.load_image(sha).shape == (30, 20, 3)


def test_a_non_square_image_is_centre_cropped_not_squashed(store: PreferenceStore) -> None:
    wide = np.full((32, 64, 3), 255, dtype=np.uint8)
    wide[:, :12] = (220, 20, 20)  # a red band in the left 12 columns, outside the centred 32-wide crop
    wide[8:24, 24:40] = (20, 20, 220)  # a blue square in the middle
    sha = stored(store, encoded(Image.fromarray(wide), "PNG"))
    square = store.load_image(sha, size=16)
    assert square.shape == (16, 16, 3)
    red = (square[..., 0] > 150) & (square[..., 1] < 100)
    assert not red.any()  # squashed, the band would fill the left 3 columns
    blue = (square[..., 2] > 150) & (square[..., 0] < 100)
    rows, cols = np.nonzero(blue)
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1  # the square stays square
    plain = np.asarray(Image.fromarray(wide[:, 16:48]).resize((16, 16), Image.Resampling.BICUBIC))
    assert np.abs(square.astype(int) - plain.astype(int)).max() <= 2  # the centre, resized


def test_transparent_pixels_are_composited_onto_white(store: PreferenceStore) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # transparent black
    rgba[0, 0] = (255, 0, 0, 255)  # one opaque red pixel
    pixels = store.load_image(stored(store, encoded(Image.fromarray(rgba), "PNG")))
    assert tuple(pixels[0, 0]) == (255, 0, 0) and np.all(pixels[1:] == 255)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 1)
    pixels = store.load_image(stored(store, encoded(palette, "PNG", transparency=0)))
    assert tuple(pixels[0, 0]) == (0, 0, 255) and np.all(pixels[1:] == 255)


def test_multi_picture_jpeg_is_stored_as_the_jpeg_it_is(store: PreferenceStore) -> None:
    first = Image.new("RGB", (8, 8), (0, 90, 0))
    data = encoded(first, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    assert Image.open(io.BytesIO(data)).format == "MPO"  # as a phone or stereo camera writes it
    sha = stored(store, data)
    info = store.image_info(sha)
    assert info.format == "JPEG" and info.path.suffix == ".jpg"
    assert store.image_bytes(sha) == data  # never re-encoded
    assert abs(int(store.load_image(sha)[4, 4, 1]) - 90) < 8


def test_a_decompression_bomb_is_a_bad_row_not_a_crash(
    tmp_path: Path, store: PreferenceStore, monkeypatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # a 16 x 16 image is then over twice the limit
    (tmp_path / "a.png").write_bytes(drawn(3))
    (tmp_path / "b.png").write_bytes(drawn(4))
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"prompt": "p", "images": ["a.png", "b.png"], "choice": "tie"})
    )
    good, bad = split(read_format("jsonl", tmp_path / "c.jsonl"))
    assert not good and bad[0].where == "c.jsonl line 1" and "too large" in bad[0].reason
    item = NewComparison("p", [drawn(3), drawn(4)], "tie", where="row 7")
    with pytest.raises(ImportAborted, match="row 7: image 0: image is too large"):
        store.add([item])
    assert store.add([item], skip_bad=True).skipped[0].where == "row 7"
    assert store.count() == 0


# --- Pick-a-Pic and ImageRewardDB parquet -------------------------------------------------------


def test_nanosecond_timestamps_read_as_python_datetimes(tmp_path: Path) -> None:
    table = pa.Table.from_pylist([pickapic_row(0), pickapic_row(1)])
    i = table.schema.get_field_index("created_at")
    nanos = pa.array([1680341400123456789, None], pa.timestamp("ns"))  # as pandas writes created_at
    path = tmp_path / "ns.parquet"
    pq.write_table(table.set_column(i, "created_at", nanos), path)
    good, bad = split(read_format("pickapic", path))
    assert not bad
    assert type(good[0].created_at) is datetime  # not a pandas Timestamp, with or without pandas
    assert good[0].created_at == datetime(2023, 4, 1, 9, 30, 0, 123456, tzinfo=timezone.utc)
    assert good[1].created_at is None


def test_pickapic_unusual_cells_are_read_or_named(tmp_path: Path) -> None:
    rows = [
        # a missing number as pandas writes it; times as text
        pickapic_row(0, num_example_per_prompt=float("nan"), created_at="2023-04-01T09:30:00Z"),
        pickapic_row(1, created_at="yesterday"),
    ]
    good, bad = split(read_format("pickapic", write_parquet(tmp_path / "x.parquet", rows)))
    assert "num_example_per_prompt" not in good[0].meta and good[0].problem() is None
    assert [b.where for b in bad] == ["x.parquet row 1"] and "created_at" in bad[0].reason


def test_nan_in_meta_is_not_json(store: PreferenceStore) -> None:
    item = NewComparison("p", [drawn(1), drawn(2)], "tie", meta={"score": math.nan}, where="line 4")
    assert "meta is not JSON" in (item.problem() or "")
    with pytest.raises(ImportAborted, match="line 4: meta is not JSON"):
        store.add([item])


def test_imagerewarddb_path_only_cells_say_so(tmp_path: Path) -> None:
    cell = {"bytes": None, "path": "images/0001.webp"}
    table = pa.Table.from_pylist([{"img_better": cell, "img_worse": cell, "prompt": "p"}])
    pq.write_table(table, tmp_path / "pairs.parquet")
    _, bad = split(read_format("imagerewarddb", tmp_path / "pairs.parquet"))
    assert "images/0001.webp" in bad[0].reason


def test_parquet_exports_refuse_a_folder(tmp_path: Path, store: PreferenceStore) -> None:
    stored(store, drawn(5))
    (tmp_path / "out").mkdir()
    for fmt in ("pickapic", "parquet"):
        with pytest.raises(ExportError, match="is a folder"):
            export_format(fmt, store, tmp_path / "out")


# --- text files: byte order marks, encodings, empty files ----------------------------------------


def jsonl_line(**fields) -> str:
    return json.dumps({"prompt": "p", "images": ["a.png", "b.png"], "choice": "image", "chosen": 0, **fields})


def test_jsonl_byte_order_mark_and_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(drawn(1))
    (tmp_path / "b.png").write_bytes(drawn(2))
    text = "\ufeff" + jsonl_line() + "\r\n" + jsonl_line(chosen=1) + "\r\n"
    path = tmp_path / "c.jsonl"
    path.write_bytes(text.encode("utf-8") + b'{"prompt": "caf\xe9"}\r\n' + jsonl_line(prompt="q").encode())
    good, bad = split(read_format("jsonl", path))
    assert [g.where for g in good] == ["c.jsonl line 1", "c.jsonl line 2", "c.jsonl line 4"]
    assert [b.where for b in bad] == ["c.jsonl line 3"] and "not UTF-8" in bad[0].reason

    result = CliRunner().invoke(
        app, ["prefs", "import", "jsonl", str(path), "--store", str(tmp_path / "s.db")]
    )
    assert result.exit_code == 2 and "c.jsonl line 3: not UTF-8" in result.output


def test_hpdv2_byte_order_mark_empty_and_broken_files(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(drawn(i))
    entry = {"prompt": "p", "file_path": ["0.png", "1.png"], "human_preference": [0, 1]}
    path = tmp_path / "train.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([entry]).encode())
    good, bad = split(read_format("hpdv2", path))
    assert len(good) == 1 and not bad

    path.write_text("")
    _, bad = split(read_format("hpdv2", path))
    assert [(b.where, b.reason) for b in bad] == [("train.json", "the file is empty (expected a JSON array)")]

    path.write_text("[" + json.dumps(entry) + ", {oops}]")
    _, bad = split(read_format("hpdv2", path))
    assert [(b.where, b.reason) for b in bad] == [
        ("train.json entry 1", "not valid JSON (Expecting property name enclosed in double quotes)")
    ]

    path.write_bytes(b"[" + json.dumps(entry).encode() + b', {"prompt": "\xff"}]')
    good, bad = split(read_format("hpdv2", path))
    assert len(good) == 1 and bad[0].where == "train.json entry 1" and "not UTF-8" in bad[0].reason
    with pytest.raises(ValueError, match=r"train\.json entry 1: not UTF-8"):
        list(iter_json_array(path, chunk_size=8))


def test_hpdv2_empty_raw_annotations_fall_back_to_the_aggregate_rank(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(drawn(i))
    entry = {
        "prompt": "p",
        "image_path": ["0.png", "1.png", "2.png"],
        "rank": [2, 1, 3],
        "raw_annotations": [],
    }
    (tmp_path / "test.json").write_text(json.dumps([entry]))
    good, bad = split(read_format("hpdv2", tmp_path / "test.json"))
    assert not bad and len(good) == 3
    assert [(c.chosen, c.meta["positions"], c.rater) for c in good] == [
        (1, [0, 1], None),
        (0, [0, 2], None),
        (0, [1, 2], None),
    ]


def test_importing_data_that_is_not_there_creates_no_store(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    for fmt, path in (("pickapic", "typo.parquet"), ("hpdv2", "typo.json"), ("jsonl", "typo.jsonl")):
        result = CliRunner().invoke(app, ["prefs", "import", fmt, str(tmp_path / path), "--store", str(db)])
        assert result.exit_code == 2 and "typo" in result.output and "nothing was imported" in result.output
        assert not db.exists() and not (tmp_path / "new.images").exists()
