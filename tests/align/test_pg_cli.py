"""`diffalign align ddpo|grpo` end to end (typer's CliRunner on the align sub-app, in-process)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import diffalign.cli.align_pg  # noqa: F401  (registers the commands on the align app)
from diffalign.align.tracking import read_metrics
from diffalign.cli.align import app
from diffalign.models.registry import load_model

runner = CliRunner()
FAST = [
    "epochs=1",
    "num_steps=4",
    "guidance_scale=1",
    "prompts_per_epoch=2",
    "samples_per_prompt=2",
    "train_batch_size=6",
    "gold=none",
    "grid_every=0",
    "log_with=none",
]
REWARD = (
    "def redness(images, prompts):\n"
    "    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))\n"
)


def test_grpo_writes_a_run_whose_model_loads(tmp_path, eps_model_dir):
    (tmp_path / "reward.py").write_text(REWARD)
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "grpo",
            "--model",
            str(eps_model_dir),
            "--reward",
            f"{tmp_path / 'reward.py'}:redness",
            "--out",
            str(out),
            "--device",
            "cpu",
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    assert load_model(str(out)).prediction_type == "epsilon"
    assert read_metrics(out / "metrics.jsonl")[0]["reward_queries"] == 4
    costs = json.loads((out / "costs.json").read_text())  # measured while the command ran
    assert costs["forward_nfe"] > 0 and costs["backward_nfe"] > 0 and costs["sessions"] == 1
    assert costs["reward_queries"] is None  # the trainer loads its reward itself: not counted
    again = runner.invoke(app, ["grpo", "--model", str(eps_model_dir), "--out", str(out), *FAST])
    assert again.exit_code == 2 and "--resume" in again.output
    longer = [*FAST[1:], "epochs=2"]
    args = ["grpo", "--model", str(eps_model_dir), "--reward", f"{tmp_path / 'reward.py'}:redness"]
    refused = runner.invoke(app, [*args, "--out", str(out), "--resume", *longer])
    assert refused.exit_code == 2 and "--extend" in refused.output
    extended = runner.invoke(app, [*args, "--out", str(out), "--extend", *longer])
    assert extended.exit_code == 0, extended.output
    assert [line["step"] for line in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert (out / "model-step-0000001").is_dir() and load_model(str(out)).prediction_type == "epsilon"


def test_bad_arguments_fail_with_a_clear_message(tmp_path, eps_model_dir):
    bad_reward = runner.invoke(
        app,
        ["ddpo", "--model", str(eps_model_dir), "--reward", "no-such-reward", "--out", str(tmp_path / "a")],
    )
    assert bad_reward.exit_code == 2 and "no-such-reward" in bad_reward.output
    bad_prompts = runner.invoke(
        app,
        [
            "ddpo",
            "--model",
            str(eps_model_dir),
            "--prompts",
            str(tmp_path / "none.txt"),
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert bad_prompts.exit_code == 2 and "none.txt" in bad_prompts.output
    bad_key = runner.invoke(app, ["grpo", "--out", str(tmp_path / "c"), "samples_per_prompt=1"])
    assert bad_key.exit_code == 2 and "samples_per_prompt" in bad_key.output
