"""Rater panels from files (`diffalign.panels`): simulating, judging and gold rewards with raters nobody
built in."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffalign.align.config_io import ConfigError
from diffalign.cli import app
from diffalign.panels import load_panel, panel_fingerprint
from diffalign.prefs.store import PreferenceStore
from diffalign.rewards.registry import RewardSpecError, load_reward
from diffalign.world.raters import PanelConfig, RaterGroup, RaterPanel
from diffalign.world.shapeseval import load_shapeseval, to_jsonl
from tests.align.helpers import save_tiny_model

runner = CliRunner()

PANEL_YAML = """\
# three groups nobody built in
groups:
  - {name: minimalist, taste: {size: -1.0, centrality: 0.5}, share: 0.5}
  - {name: maximalist, taste: {size: 1.0, warmth: 1.0}, share: 0.3}
  - {name: indifferent, taste: {}, share: 0.2}
n_raters: 30
temperature: 0.06
quality_weight: 0.8
"""


@pytest.fixture
def panel_file(tmp_path):
    path = tmp_path / "panel.yaml"
    path.write_text(PANEL_YAML)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("panels") / "model", "epsilon")


def test_a_panel_file_builds_the_panel_it_describes(panel_file):
    panel = load_panel(panel_file)
    expected = RaterPanel(
        PanelConfig(
            groups=[
                RaterGroup("minimalist", {"size": -1.0, "centrality": 0.5}, 0.5),
                RaterGroup("maximalist", {"size": 1.0, "warmth": 1.0}, 0.3),
                RaterGroup("indifferent", {}, 0.2),
            ],
            n_raters=30,
            temperature=0.06,
            quality_weight=0.8,
        )
    )
    assert panel.groups == ["minimalist", "maximalist", "indifferent"]
    assert torch.equal(panel.weights, expected.weights)  # every rater's jittered weights
    assert panel_fingerprint(panel) == panel_fingerprint(expected)
    assert panel_fingerprint(panel) != panel_fingerprint(RaterPanel())
    assert load_panel(None).groups == RaterPanel().groups


def test_a_bad_panel_file_names_the_line_and_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n  - {name: a, taste: {size: 1.0}}\ntemprature: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line 3: .*'temprature'.*did you mean 'temperature'"):
        load_panel(bad)
    bad.write_text("groups:\n  - {name: a, taste: {sise: 1.0}}\n")
    with pytest.raises(ConfigError, match=r"unknown feature\(s\) \['sise'\]"):
        load_panel(bad)


def test_gold_rewards_take_a_panel_file_after_an_at(panel_file):
    reward = load_reward(f"shapes:rater-minimalist@{panel_file}")
    images, prompts = torch.rand(3, 3, 32, 32), ["a red circle", "two squares", "a blue triangle"]
    panel = load_panel(panel_file)
    expected = panel.utility(panel.features(images, prompts), group="minimalist").float()
    assert torch.allclose(reward(images, prompts), expected)
    pooled = load_reward(f"shapes:utility@{panel_file}")
    assert torch.allclose(pooled(images, prompts), panel.utility(panel.features(images, prompts)).float())
    with pytest.raises(RewardSpecError, match=r"no such gold reward.*the panel of .*gold-utility:maximalist"):
        load_reward(f"shapes:rater-bold@{panel_file}")  # the default panel's group, not this one's
    with pytest.raises(RewardSpecError, match="no panel file after '@'"):
        load_reward("shapes:utility@")


def test_simulated_pairs_are_labelled_by_the_panel_file_and_never_mixed_with_another_panels(
    tmp_path, tiny_model, panel_file
):
    store = tmp_path / "prefs.db"
    common = ["prefs", "simulate", "--model", str(tiny_model), "--store", str(store), "--steps", "2"]
    result = runner.invoke(app, [*common, "--pairs", "6", "--panel", str(panel_file), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    stored = list(PreferenceStore.open(str(store)).comparisons())
    assert len(stored) == 6
    assert {c.rater_group for c in stored} <= {"minimalist", "maximalist", "indifferent"}
    fingerprint = panel_fingerprint(load_panel(panel_file))
    assert {c.meta["panel"]["fingerprint"] for c in stored} == {fingerprint}
    # the same seed with the default panel would take these labels for its own: refused
    other = runner.invoke(app, [*common, "--pairs", "8", "--device", "cpu"])
    assert other.exit_code == 2 and "made with panel" in " ".join(other.output.split())
    resampled = runner.invoke(app, [*common, "--pairs", "8", "--panel", str(panel_file), "--steps", "3"])
    assert resampled.exit_code == 2 and "sampler" in resampled.output
    assert len(list(PreferenceStore.open(str(store)).comparisons())) == 6  # nothing written by either
    more = runner.invoke(app, [*common, "--pairs", "8", "--panel", str(panel_file), "--device", "cpu"])
    assert more.exit_code == 0, more.output
    assert len(list(PreferenceStore.open(str(store)).comparisons())) == 8
    bad = runner.invoke(app, [*common, "--pairs", "1", "--panel", str(tmp_path / "none.yaml")])
    assert bad.exit_code == 2 and "--panel" in bad.output


def test_eval_judges_the_win_rate_by_a_panel_files_group(tmp_path, tiny_model, panel_file):
    subset = tmp_path / "subset.jsonl"
    subset.write_text(to_jsonl(load_shapeseval()[::100]))
    args = ["eval", "--model", str(tiny_model), "--samples-per-prompt", "1", "--steps", "2"]
    args += [
        "--device",
        "cpu",
        "--prompts",
        str(subset),
        "--baseline",
        str(tiny_model),
        "--panel",
        str(panel_file),
    ]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "e"), "--judge", "panel:maximalist"])
    assert result.exit_code == 0, result.output
    suite = json.loads((tmp_path / "e" / "results.json").read_text())["suite"]
    assert suite["win_rate"]["win_rate"] == 0.5  # the model against itself
    assert suite["win_rate"]["judge"] == "panel:maximalist"
    missing = runner.invoke(app, [*args, "--out", str(tmp_path / "m"), "--judge", "panel:bold"])
    assert missing.exit_code == 2 and "has no group 'bold'" in " ".join(missing.output.split())
    assert not (tmp_path / "m").exists()  # refused before sampling
    wrong = runner.invoke(app, [*args, "--out", str(tmp_path / "w"), "--judge", "shapes:utility"])
    assert wrong.exit_code == 2 and "--panel" in wrong.output


def test_a_gold_rewards_panel_file_is_part_of_its_fingerprint(panel_file):
    from diffalign.evaluate.overopt import spec_fingerprint

    spec = f"shapes:utility@{panel_file}"
    before = spec_fingerprint(spec)
    assert before is not None and spec_fingerprint("shapes:utility") is None
    panel_file.write_text(PANEL_YAML.replace("temperature: 0.06", "temperature: 0.05"))
    assert spec_fingerprint(spec) != before  # an edited panel is another measurement


def test_eval_names_a_prompt_the_model_cannot_read_before_sampling(tmp_path, tiny_model):
    prompts = tmp_path / "geneval.jsonl"
    lines = load_shapeseval()[:2]
    lines.append({**lines[0], "prompt": "a photo of a circle"})  # GenEval's wording, not the world's
    prompts.write_text(to_jsonl(lines))
    out = tmp_path / "e"
    args = ["eval", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out), "--steps", "2"]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 2
    assert "prompt 3 ('a photo of a circle')" in " ".join(result.output.split())
    assert not list(out.glob("*/samples/*.png"))
