"""`diffalign eval` on a diffusers pipeline folder (a tiny random SD pipeline built in the test): the
ShapesEval scoring, rewards, the win rate and KL of the metric suite, and steered sampling run on it as
on the tiny models."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.world.shapeseval import load_shapeseval, to_jsonl
from tests.models.tiny_pipelines import build_sd

runner = CliRunner()


def _eval(*args) -> None:
    result = runner.invoke(app, ["eval", *[str(a) for a in args]], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_eval_with_rewards_win_rate_kl_and_steering_on_a_pipeline(tmp_path):
    folder = build_sd(tmp_path / "sd")
    lines = load_shapeseval()[::100]
    subset = tmp_path / "subset.jsonl"
    subset.write_text(to_jsonl(lines))
    common = ["--model", folder, "--samples-per-prompt", 2, "--steps", 3, "--prompts", subset]
    out = tmp_path / "eval"
    suite = ["--reward", "shapes:faithfulness", "--baseline", folder, "--kl-base", folder, "--eta", 1]
    _eval(*common, "--device", "cpu", "--out", out, *suite)
    results = json.loads((out / "results.json").read_text())
    suite = results["suite"]
    assert suite["win_rate"]["win_rate"] == 0.5  # the pipeline against itself, same seeds
    assert suite["win_rate"]["pairs"] == 2 * len(lines)
    assert abs(suite["kl"]["kl"]) < 1e-6
    assert 0.0 <= suite["rewards"]["shapes:faithfulness"]["mean"] <= 1.0
    steered = tmp_path / "steered"
    steer = ["--steer", "bon", "--steer-reward", "shapes:faithfulness", "--budget-nfe", 12]
    _eval(*common, "--device", "cpu", "--out", steered, *steer)
    assert (steered / "results.json").is_file()
