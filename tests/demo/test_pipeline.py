"""The demo pipeline end to end on a tiny 16x16 model: every stage, the report's data, measured costs,
stage records that a rerun reuses, a changed config refused, and `diffalign report` on run folders."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.demo.config import DemoConfig
from diffalign.demo.pipeline import run_demo
from tests.demo.test_report_browser import inspect_report


def tiny_config(model: str = "base") -> DemoConfig:
    """The shipped base model (its samples are shapes, which the detector reads fast, where a random
    model's noise is slow to read) with every budget cut to a few examples."""
    return DemoConfig(
        model=model,
        num_steps=2,
        pairs=12,
        rm_epochs=1,
        rm_pretrain_steps=0,
        grpo_epochs=1,
        grpo_prompts=2,
        grpo_group=2,
        draft_steps=2,
        draft_batch=2,
        dpo_steps=2,
        dpo_batch=2,
        fk_particles=2,
        eval_prompts_per_task=1,
        eval_samples_per_prompt=2,
        batch_size=16,
        device="cpu",
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, DemoConfig, list[str]]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo")
    config = tiny_config()
    lines: list[str] = []
    run_demo(config, root / "out", log=lines.append, command="diffalign demo --quick")
    return root / "out", config, lines


def test_every_stage_and_system_is_reported(demo):
    out, config, lines = demo
    data = json.loads((out / "report.json").read_text())
    assert (out / "report.html").is_file()
    assert [s["name"] for s in data["systems"]] == ["base", "grpo", "draft", "dpo", "fk-2"]
    assert [s["paradigm"] for s in data["systems"][1:]] == [
        "policy-gradient RL",
        "reward backpropagation",
        "DPO family",
        "test-time steering",
    ]
    assert [stage["name"] for stage in data["setup"]] == ["preferences", "reward model"]
    images = 6 * config.eval_prompts_per_task * config.eval_samples_per_prompt
    for system in data["systems"]:
        assert sum(c["images"] for c in system["eval"]["categories"].values()) == images
        assert 0.0 <= system["eval"]["overall"] <= 1.0
        for path in system["grids"].values():
            assert (out / path).is_file()
    assert data["systems"][0]["eval"]["win_rate"] is None
    for system in data["systems"][1:]:
        assert 0.0 <= system["eval"]["win_rate"]["rate"] <= 1.0
        assert system["eval"]["proxy_reward"] is not None
    assert data["quick"] is True
    assert any(line.startswith("[5/5]") for line in lines)


def test_the_pipeline_report_renders_in_chromium(demo):
    out, _, _ = demo
    images, errors, missing = inspect_report(out / "report.html")
    data = json.loads((out / "report.json").read_text())
    grids = sum(len(system["grids"]) for system in data["systems"])
    assert len(images) >= grids + 1
    assert [i for i in images if not i["complete"] or i["width"] == 0] == []
    assert errors == [] and missing == []


def test_costs_are_measured_not_configured(demo):
    out, config, _ = demo
    data = json.loads((out / "report.json").read_text())
    by_name = {s["name"]: s for s in data["systems"]}
    guided = 2  # guidance 3: two rows per sample and step
    # Preferences: two images per pair, num_steps guided steps each.
    pref = data["setup"][0]
    assert pref["costs"]["forward_nfe"] == config.pairs * 2 * config.num_steps * guided
    # Diffusion-DPO: per pair, the policy and the frozen reference each see the winner and the loser.
    dpo = by_name["dpo"]["costs"]
    assert dpo["forward_nfe"] == config.dpo_steps * config.dpo_batch * 4
    assert dpo["backward_nfe"] == config.dpo_steps * config.dpo_batch * 2
    assert dpo["preference_pairs"] == config.dpo_steps * config.dpo_batch
    assert dpo["reward_queries"] == 0
    # Reward-based trainers query the reward model; DRaFT backpropagates through it.
    assert (
        by_name["grpo"]["costs"]["reward_queries"]
        == config.grpo_epochs * config.grpo_prompts * config.grpo_group
    )
    assert by_name["grpo"]["costs"]["backward_nfe"] > 0
    draft = by_name["draft"]["costs"]
    assert draft["reward_queries"] == config.draft_steps * config.draft_batch and draft["reward_grads"] > 0
    # FK steering pays at inference: about fk_particles times the plain NFEs per image.
    fk = by_name["fk-2"]["costs"]
    plain = config.num_steps * guided
    assert by_name["grpo"]["costs"]["inference_nfe_per_image"] == plain
    assert plain < fk["inference_nfe_per_image"] <= config.fk_particles * plain
    for name in ("grpo", "draft", "dpo"):
        assert json.loads((out / "runs" / name / "costs.json").read_text())["forward_nfe"] > 0


def test_a_rerun_reuses_finished_stages_and_a_changed_config_is_refused(demo, monkeypatch):
    out, config, _ = demo
    import diffalign.demo.pipeline as pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was run again")

    for name in ("train_pg", "train_backprop", "train_dpo", "simulate_preferences", "train_reward_model"):
        monkeypatch.setattr(pipeline, name, no_training)
    run_demo(config, out, log=lambda line: None)
    with pytest.raises(ValueError, match="differs in pairs"):
        run_demo(replace(config, pairs=13), out, log=lambda line: None)


def test_report_command_rerenders_a_demo_and_evaluates_run_folders(demo, tmp_path):
    out, _, _ = demo
    runner = CliRunner()
    again = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "copy")])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "copy" / "report.html").is_file()
    result = runner.invoke(
        app,
        [
            "report",
            str(out / "runs" / "dpo"),
            str(out / "runs" / "draft"),
            "--out",
            str(tmp_path / "runs"),
            "--prompts-per-task",
            "1",
            "--steps",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "runs" / "report.json").read_text())
    assert [s["name"] for s in data["systems"]] == ["base", "dpo", "draft"]
    assert data["systems"][1]["costs"]["forward_nfe"] > 0
    assert data["systems"][2]["paradigm"] == "reward backpropagation"
    bad = runner.invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code != 0 and "not a run folder" in bad.output


def test_demo_command_rejects_a_bad_override(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--set", "pairs=0"])
    assert result.exit_code != 0 and "pairs must be >= 1" in result.output
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--set", "nonsense=1"])
    assert result.exit_code != 0 and "nonsense" in result.output
