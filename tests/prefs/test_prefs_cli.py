"""`diffalign prefs import / export / stats` end to end (typer's CliRunner, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.prefs.records import NewComparison
from diffalign.prefs.store import PreferenceStore
from tests.prefs.test_formats import drawn, good_shard, pickapic_row, snapshot, write_parquet

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["prefs", *map(str, args)], catch_exceptions=False)


def test_import_stats_export_reimport(tmp_path: Path) -> None:
    db = tmp_path / "prefs.db"
    shard = good_shard(tmp_path / "train-0000.parquet")
    result = invoke("import", "pickapic", shard, "--store", db)
    assert result.exit_code == 0, result.output
    assert "imported 4 comparisons" in result.output and "8 new images" in result.output

    again = invoke("import", "pickapic", shard, "--store", db)
    assert (
        again.exit_code == 0
        and "imported 0 comparisons" in again.output
        and "4 already there" in again.output
    )

    stats = invoke("stats", "--store", db, "--json")
    assert stats.exit_code == 0
    numbers = json.loads(stats.stdout)
    assert (numbers["comparisons"], numbers["images"], numbers["prompts"], numbers["raters"]) == (4, 8, 3, 2)
    assert numbers["by_source"] == {"pickapic": {"image": 3, "tie": 1}}
    table = invoke("stats", "--store", db)
    assert table.exit_code == 0
    assert "comparisons by source and choice" in table.stdout and "pickapic" in table.stdout

    out = tmp_path / "out.parquet"
    exported = invoke("export", "pickapic", out, "--store", db)
    assert exported.exit_code == 0 and "wrote 4 rows from 4 comparisons" in exported.output
    assert pq.ParquetFile(out).metadata.num_rows == 4
    back = invoke("import", "pickapic", out, "--store", db)
    assert back.exit_code == 0 and "imported 0 comparisons" in back.output

    fresh = tmp_path / "fresh.db"
    assert invoke("import", "pickapic", out, "--store", fresh, "--limit", 3).exit_code == 0
    with PreferenceStore.open(fresh) as store:
        assert store.count() == 3

    folder = tmp_path / "jsonl"
    assert invoke("export", "jsonl", folder, "--store", db, "--source", "pickapic").exit_code == 0
    assert len((folder / "comparisons.jsonl").read_text().splitlines()) == 4
    hf = invoke("export", "hf", tmp_path / "hf", "--store", db)
    assert hf.exit_code == 0 and (tmp_path / "hf" / "dataset_info.json").exists()


def test_bad_row_aborts_with_file_and_row_and_skip_bad_reports(tmp_path: Path) -> None:
    db = tmp_path / "prefs.db"
    assert invoke("import", "pickapic", good_shard(tmp_path / "good.parquet"), "--store", db).exit_code == 0
    with PreferenceStore.open(db) as store:
        before = snapshot(store)
    rows = [pickapic_row(i) for i in range(10, 15)]
    rows[1]["jpg_1"] = drawn(1)[:30]  # a corrupt image in the middle
    rows[3] = pickapic_row(13, 0.0, 0.0)
    bad = write_parquet(tmp_path / "train-0007.parquet", rows)

    result = invoke("import", "pickapic", bad, "--store", db)
    assert result.exit_code == 2
    assert "train-0007.parquet row 1" in result.output and "nothing was imported" in result.output
    with PreferenceStore.open(db) as store:
        assert snapshot(store) == before

    skipped = invoke("import", "pickapic", bad, "--store", db, "--skip-bad")
    assert skipped.exit_code == 0
    assert "imported 3 comparisons" in skipped.output and "skipped 2 bad rows" in skipped.output
    assert "train-0007.parquet row 3: no preference" in skipped.output


def test_cli_errors_exit_2_with_clear_messages(tmp_path: Path) -> None:
    db = tmp_path / "prefs.db"
    unknown = invoke("import", "nope", tmp_path, "--store", db)
    assert (
        unknown.exit_code == 2 and "unknown format 'nope'" in unknown.output and "pickapic" in unknown.output
    )
    missing = invoke("import", "jsonl", tmp_path / "none.jsonl", "--store", db)
    assert missing.exit_code == 2 and "none.jsonl: no such file" in missing.output
    inline = invoke("import", "pickapic", tmp_path, "--store", db, "--images", tmp_path)
    assert inline.exit_code == 2 and "inline" in inline.output
    no_store = invoke("stats", "--store", tmp_path / "absent.db")
    assert no_store.exit_code == 2 and "no preference store" in no_store.output
    assert not (tmp_path / "absent.db").exists()
    bad_export = invoke("export", "csv", tmp_path / "x", "--store", db)
    assert bad_export.exit_code == 2 and "unknown export format 'csv'" in bad_export.output

    with PreferenceStore.open(db) as store:
        store.add([NewComparison("three", [drawn(1), drawn(2), drawn(3)], "image", 0, source="collect")])
    refused = invoke("export", "pickapic", tmp_path / "p.parquet", "--store", db)
    assert refused.exit_code == 2 and "--expand" in refused.output and "nothing was written" in refused.output
    assert not (tmp_path / "p.parquet").exists()
    expanded = invoke("export", "pickapic", tmp_path / "p.parquet", "--store", db, "--expand")
    assert expanded.exit_code == 0 and "wrote 2 rows from 1 comparisons" in expanded.output
