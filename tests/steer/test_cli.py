"""`diffalign steer ...` and `diffalign eval --steer ...` on a tiny 16x16 model."""

import json

import pytest
from typer.testing import CliRunner

from diffalign.cli import app
from tests.align.helpers import save_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("steer") / "model", "epsilon")


def _steer(*args):
    return runner.invoke(app, ["steer", *args, "--device", "cpu", "--steps", "3", "--guidance", "1"])


def test_steer_writes_images_and_an_exact_summary(model_dir, tmp_path):
    out = tmp_path / "fk"
    result = _steer(
        "fk",
        "--model",
        str(model_dir),
        "--reward",
        "shapes:faithfulness-partial",
        "--prompt",
        "a red circle",
        "--prompt",
        "a square",
        "--budget-nfe",
        "6",
        "--set",
        "potential=sum",
        "--set",
        "resample_every=1",
        "--set",
        "resample_start=0",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["num_particles"] == 2 and summary["config"]["potential"] == "sum"
    assert summary["per_prompt"]["nfe"] == 6  # 2 particles x 3 steps, no guidance
    assert summary["per_prompt"]["reward_calls"] == 2 * 3  # 2 particles scored at each of the 3 steps
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png"]


def test_steer_errors_name_the_problem(model_dir, tmp_path):
    base = ["--model", str(model_dir), "--prompt", "a square", "--out", str(tmp_path / "x")]
    result = _steer("guidance", *base, "--reward", "shapes:faithfulness")
    assert result.exit_code == 2 and "not differentiable" in result.output
    result = _steer("bon", *base, "--reward", "shapes:faithfulness", "--budget-nfe", "2")
    assert result.exit_code == 2 and "too small" in result.output
    result = _steer("bon", *base, "--reward", "shapes:faithfulness", "--set", "particles=3")
    assert result.exit_code == 2 and "particles" in result.output
    result = _steer("search", *base, "--reward", "shapes:faithfulness", "--eta", "1")
    assert result.exit_code == 2 and "deterministic sampler" in result.output
    missing = tmp_path / "no-ensemble"
    result = _steer("bon", *base, "--reward", f"penalised:{missing}")
    assert result.exit_code == 2 and "is not a folder" in result.output
    assert " ".join(result.output.split()).count(f"--reward 'penalised:{missing}'") == 1  # named once


def test_eval_with_a_steered_sampler(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps(
            {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a circle"}
        )
        + "\n"
    )
    out = tmp_path / "eval"
    args = [
        "eval",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--samples-per-prompt",
        "2",
        "--steps",
        "2",
        "--guidance",
        "1",
        "--prompts",
        str(prompts),
        "--device",
        "cpu",
    ]
    result = runner.invoke(
        app, [*args, "--steer", "bon", "--steer-reward", "shapes:faithfulness", "--budget-nfe", "4"]
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["n_images"] == 2
    result = runner.invoke(app, [*args, "--steer", "fk", "--steer-reward", "shapes:faithfulness"])
    assert result.exit_code == 2 and "stochastic sampler" in result.output


def test_set_values_are_converted_to_the_field_types(model_dir, tmp_path):
    base = ["--model", str(model_dir), "--prompt", "a square", "--reward", "shapes:faithfulness"]
    out = tmp_path / "bon"
    # YAML reads 2e0 as the float 2.0: checked as an integer, but passed on as the float, the run
    # failed with a TypeError traceback ('float' object cannot be interpreted as an integer)
    result = _steer("bon", *base, "--set", "n=2e0", "--set", "batch_size=1e0", "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["n"] == 2 and isinstance(summary["config"]["n"], int)
    assert summary["per_prompt"]["reward_calls"] == 2


def test_a_budget_and_the_field_it_sizes_are_one_error(model_dir, tmp_path):
    base = ["--model", str(model_dir), "--prompt", "a square", "--reward", "shapes:faithfulness"]
    result = _steer("bon", *base, "--budget-nfe", "6", "--set", "n=3", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "n=3 and budget_nfe=6 both set n" in result.output
