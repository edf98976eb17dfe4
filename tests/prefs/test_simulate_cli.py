"""`diffalign prefs simulate`: pairs from a model, labelled by the panel, in the store; reruns add nothing."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.prefs.store import PreferenceStore

runner = CliRunner()


def test_simulate_writes_labelled_pairs_and_is_idempotent(tmp_path: Path) -> None:
    store = tmp_path / "prefs.db"
    args = ["prefs", "simulate", "--store", str(store), "--pairs", "4", "--steps", "2", "--batch-size", "8"]
    first = runner.invoke(app, [*args, "--device", "cpu"])
    assert first.exit_code == 0, first.output
    assert "two-rater agreement" in first.output
    with PreferenceStore.open(store, create=False) as prefs:
        stored = list(prefs.comparisons())
        assert len(stored) == 4
        assert {c.source for c in stored} == {"simulated"}
        assert all(c.rater and c.rater_group for c in stored)
        assert all(c.choice in ("image", "tie") for c in stored)
    again = runner.invoke(app, [*args, "--device", "cpu"])
    assert again.exit_code == 0, again.output
    with PreferenceStore.open(store, create=False) as prefs:
        assert prefs.count() == 4


def test_simulate_rejects_bad_arguments(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prefs", "simulate", "--store", str(tmp_path / "p.db"), "--pairs", "0"])
    assert result.exit_code == 2 and "--pairs must be at least 1" in result.output
    result = runner.invoke(
        app, ["prefs", "simulate", "--store", str(tmp_path / "p.db"), "--model", str(tmp_path / "nope")]
    )
    assert result.exit_code == 2 and "no such folder" in result.output
