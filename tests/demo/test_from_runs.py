"""`diffalign report RUN...` on run folders that are incomplete or malformed: each is refused, before any
model is sampled, with an error naming the file (and line); report names never leave the report folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.demo.from_runs import ReportRunsError, read_run, system_names
from diffalign.evaluate.costs import StageCost

COSTS = StageCost(1.0, 10, 4, 8, 0, 12.0, "cpu-rss").to_dict() | {"sessions": 1, "processes": 1}


def _run(folder: Path, costs: object = None, metrics: str | None = None) -> Path:
    (folder / "model").mkdir(parents=True)
    record = {"trainer": "grpo", "config": {"method": "grpo", "model": "base", "reward": "gold-utility"}}
    (folder / "config.json").write_text(json.dumps(record))
    if costs is not None:
        (folder / "costs.json").write_text(costs if isinstance(costs, str) else json.dumps(costs))
    if metrics is not None:
        (folder / "metrics.jsonl").write_text(metrics)
    return folder


def test_a_complete_run_reads_its_costs_and_curves(tmp_path):
    run = _run(
        tmp_path / "grpo", COSTS, '{"step": 1, "reward_mean": 0.5}\n\n{"step": 2, "kl_to_base": 0.1}\n'
    )
    info = read_run(run)
    assert info["costs"]["forward_nfe"] == 10 and info["costs"]["processes_counted"] == 1
    assert info["curves"] == [{"step": 1, "reward_mean": 0.5}, {"step": 2, "kl_to_base": 0.1}]


@pytest.mark.parametrize(
    "costs, metrics, message",
    [
        ({"wall_s": 1.0}, None, r"costs\.json: not a costs file, it lacks 'forward_nfe'"),
        (COSTS | {"forward_nfe": "ten"}, None, r"costs\.json: 'forward_nfe' must be a number or null"),
        (COSTS | {"memory_kind": None}, None, r"costs\.json: 'memory_kind' must be a string"),
        (COSTS, '{"step": 1}\n{"step": 2, "loss"\n', r"metrics\.jsonl line 2: not valid JSON"),
        (COSTS, '{"loss": 0.1}\n', r"metrics\.jsonl line 1: expected a metrics record with a numeric 'step'"),
        (COSTS, "[1, 2]\n", r"metrics\.jsonl line 1: expected a metrics record"),
    ],
)
def test_malformed_costs_and_logs_are_refused_naming_the_file(tmp_path, costs, metrics, message):
    run = _run(tmp_path / "grpo", costs, metrics)
    with pytest.raises(ReportRunsError, match=message):
        read_run(run)


def test_a_bad_costs_file_of_another_process_is_named(tmp_path):
    run = _run(tmp_path / "grpo", COSTS)
    (run / "costs-rank-1.json").write_text(json.dumps(COSTS | {"backward_nfe": [4]}))
    with pytest.raises(ReportRunsError, match=r"costs-rank-1\.json: 'backward_nfe'"):
        read_run(run)


@pytest.mark.parametrize("record", ["[1]", '{"config": {"model": "base"}}', '{"config": []}'])
def test_a_config_that_is_not_a_run_record_is_named(tmp_path, record):
    run = _run(tmp_path / "grpo")
    (run / "config.json").write_text(record)
    with pytest.raises(ReportRunsError, match=r"config\.json: not a diffalign run record"):
        read_run(run)


def test_report_names_stay_inside_the_report_and_are_distinct(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("base", "grpo", "x/a/grpo", "y/a/grpo"):
        Path(folder).mkdir(parents=True)
    names = system_names([Path(p) for p in ("base", "grpo", "x/a/grpo", "y/a/grpo")])
    assert names[1:] == ["grpo", "a/grpo", "y/a/grpo"]
    assert names[0] != "base" and not Path(names[0]).is_absolute()  # the base model's name is taken
    with pytest.raises(ReportRunsError, match="given twice"):
        system_names([Path("grpo"), Path("./grpo")])


def test_report_cli_refuses_a_broken_log_before_sampling(tmp_path):
    run = _run(tmp_path / "grpo", COSTS, "{broken\n")
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "metrics.jsonl line 1" in result.output
    assert not (tmp_path / "out").exists()  # nothing was sampled


def test_report_cli_names_a_malformed_report_json(tmp_path):
    (tmp_path / "report.json").write_text("{broken")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "report.json: not readable JSON" in result.output
