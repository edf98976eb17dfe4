"""Preference trainers on data and settings nobody wrote the happy-path tests for: prompts a tiny model
cannot read, method-specific config fields, labellers given as panel groups or unimportable modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffalign.align.dpo import DPOConfig, PreferenceDataError, train_dpo
from diffalign.align.online_dpo import OnlineDPOConfig, load_labeller, load_labelling_panel
from diffalign.align.spin import RealExamples, SPINConfig, train_spin
from diffalign.cli.align import app
from diffalign.prefs.pairs import PreferencePairs
from diffalign.rewards.registry import RewardSpecError
from tests.align.helpers import config, make_pairs


def with_prompt(pairs: PreferencePairs, index: int, prompt: str) -> PreferencePairs:
    prompts = list(pairs.prompts)
    prompts[index] = prompt
    keys = [f"k:{i}" for i in range(len(pairs))]
    return PreferencePairs(prompts, pairs.images_a, pairs.images_b, pairs.prob_a, keys=keys)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_prompt_the_tiny_model_cannot_read_is_refused_before_training(tmp_path, eps_model_dir, method):
    # The bad prompt is the last of 12 pairs: drawn late, it used to stop the run mid-training after
    # checkpoints had been written. It is named, with its comparison, before anything is written.
    pairs = with_prompt(make_pairs(12), 11, "a photo of a cat")
    run = tmp_path / "run"
    cfg = config(eps_model_dir, method=method, steps=6, batch_size=2, checkpoint_every=1)
    with pytest.raises(PreferenceDataError, match=r"comparison k:11 \(1 example with this prompt\).*'photo'"):
        train_dpo(cfg, pairs, run)
    assert not (run / "checkpoints").exists()
    assert not (run / "config.json").exists()


def test_a_tie_with_an_unreadable_prompt_is_not_trained_so_not_refused(tmp_path, eps_model_dir):
    pairs = with_prompt(make_pairs(4, ties=1), 3, "a photo of a cat")
    train_dpo(config(eps_model_dir, steps=1, batch_size=2), pairs, tmp_path / "run")
    assert (tmp_path / "run" / "model").is_dir()


def test_spin_names_a_real_example_the_model_cannot_read(tmp_path, eps_model_dir):
    pairs = make_pairs(3)
    real = RealExamples(["a red circle", "too many words " * 5, "a blue square"], pairs.images_a, "mine")
    cfg = SPINConfig(dpo=config(eps_model_dir, steps=1, batch_size=2), rounds=1, sample_steps=2)
    with pytest.raises(PreferenceDataError, match="real examples from mine, example 1"):
        train_spin(cfg, real, tmp_path / "spin")


def test_sft_weight_is_refused_for_kto():
    # KTO has no winners' term: sft_weight used to be accepted and silently ignored.
    with pytest.raises(ValueError, match="sft_weight"):
        DPOConfig(method="kto", sft_weight=0.5)
    assert DPOConfig(method="dpo", sft_weight=0.5).sft_weight == 0.5


def test_panel_group_labellers(tmp_path):
    assert load_labeller(OnlineDPOConfig(labeller="panel:bold")) is None
    panel = load_labelling_panel("panel:calm")
    assert [g.name for g in panel.config.groups] == ["calm"]
    assert [g.name for g in load_labelling_panel("panel").config.groups] == ["bold", "calm"]
    file = tmp_path / "panel.yaml"
    file.write_text("groups:\n  - {name: mini, taste: {size: -1.0}}\n  - {name: maxi, taste: {size: 1.0}}\n")
    assert [g.name for g in load_labelling_panel(f"panel:maxi@{file}").config.groups] == ["maxi"]
    with pytest.raises(RewardSpecError, match=r"no group 'young'.*bold, calm"):
        load_labelling_panel("panel:young")
    with pytest.raises(RewardSpecError, match="no group after"):
        load_labelling_panel("panel:")
    with pytest.raises(RewardSpecError, match="no panel file"):
        load_labelling_panel("panel@")


def test_cli_an_unimportable_labeller_exits_2_without_a_traceback(tmp_path):
    # `panel:bold` was read as module `panel`; now a missing module is a clean --labeller error.
    result = CliRunner().invoke(
        app, ["online-dpo", "--out", str(tmp_path / "o"), "--labeller", "no_such_module_x:fn", "rounds=1"]
    )
    assert result.exit_code == 2, result.output
    assert "cannot import module 'no_such_module_x'" in result.output
    assert not Path(tmp_path / "o").exists()


def test_cli_an_unimportable_reward_exits_2_without_a_traceback(tmp_path, eps_model_dir):
    result = CliRunner().invoke(
        app,
        ["grpo", "--out", str(tmp_path / "g"), "--model", str(eps_model_dir), "--reward", "no_such_mod_y:fn"],
    )
    assert result.exit_code == 2, result.output
    assert "--reward" in result.output and "no_such_mod_y" in result.output
