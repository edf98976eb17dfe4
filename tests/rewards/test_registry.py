"""`--reward` resolution: gold names and aliases, external names, folders, callables, and clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from diffalign.rewards import RewardSpecError, load_reward
from diffalign.rewards.gold import GroupUtility, ShapesFaithfulness
from diffalign.world.dataset import ShapesGenerator


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("shapes:faithfulness", "gold-faithfulness"),
        ("gold-faithfulness", "gold-faithfulness"),
        ("shapes:faithfulness-partial", "gold-faithfulness:partial"),
        ("shapes:utility", "gold-utility"),
        ("shapes:quality", "gold-quality"),
    ],
)
def test_gold_names_and_aliases(spec: str, name: str) -> None:
    assert load_reward(spec).name == name


def test_rater_group_reward_is_that_groups_utility() -> None:
    group = GroupUtility().panel.groups[0]
    reward = load_reward(f"shapes:rater-{group}")
    assert isinstance(reward, GroupUtility) and reward.group == group
    assert load_reward(f"gold-utility:{group}").name == reward.name


def test_gold_faithfulness_scores_correct_renders_one() -> None:
    batch = ShapesGenerator().sample(6, torch.Generator().manual_seed(0))
    reward = load_reward("shapes:faithfulness")
    assert isinstance(reward, ShapesFaithfulness)
    assert reward(batch.images, batch.prompts).tolist() == [1.0] * 6


def test_unknown_gold_group_lists_what_exists() -> None:
    with pytest.raises(RewardSpecError, match=r"no such gold reward.*gold-utility"):
        load_reward("shapes:rater-nobody")


def test_callable_spec(tmp_path: Path) -> None:
    file = tmp_path / "my_reward.py"
    file.write_text(
        "import torch\n\ndef brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n"
    )
    reward = load_reward(f"{file}:brightness")
    images = torch.rand(3, 3, 8, 8)
    assert torch.allclose(reward(images, ["a"] * 3), images.mean(dim=(1, 2, 3)))


def test_external_name_without_weights_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        load_reward(f"clip={tmp_path / 'nothing'}")


@pytest.mark.parametrize("spec", ["", "   ", "no-such-reward", "missing-folder/"])
def test_unknown_specs_name_the_forms(spec: str) -> None:
    with pytest.raises(RewardSpecError, match="--reward"):
        load_reward(spec)


def test_callable_spec_mistakes_are_reward_spec_errors(tmp_path: Path) -> None:
    """The CLI commands report a RewardSpecError (a ValueError) as an error line, not a traceback."""
    file = tmp_path / "scores.py"
    file.write_text("LIMIT = 3\n\ndef score(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    with pytest.raises(RewardSpecError, match=r"has no attribute 'scor'; callables: score"):
        load_reward(f"{file}:scor")
    with pytest.raises(RewardSpecError, match="not a callable"):
        load_reward(f"{file}:LIMIT")
    with pytest.raises(RewardSpecError, match=r"getcwd\(\) cannot be called as \(images, prompts\)"):
        load_reward("os:getcwd")
    with pytest.raises(
        RewardSpecError, match=re.escape(f"{file}:FUNCTION")
    ):  # a file without the function's name
        load_reward(str(file))


@pytest.mark.parametrize(
    ("spec", "suggestion"),
    [
        ("clipp", "clip"),
        ("shapes:faithfulnes", "shapes:faithfulness"),
        ("SHAPES:faithfulness", "shapes:faithfulness"),
        ("gold-qualty", "gold-quality"),
        ("penalized:runs/ensemble", "penalised:runs/ensemble"),
    ],
)
def test_typos_get_a_suggestion(spec: str, suggestion: str) -> None:
    with pytest.raises(RewardSpecError, match=f"did you mean '{suggestion}'"):
        load_reward(spec)


def test_external_aliases_and_spaces_around_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-clip-here"
    for spec in (f"clipscore={missing}", f"clip = {missing}"):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):  # reaches the CLIP loader
            load_reward(spec)


def _learned(folder: Path) -> Path:
    from diffalign.rewards.learned import build_reward_model

    return build_reward_model(["a red circle"]).save(folder)


def test_damaged_reward_model_folder_names_it(tmp_path: Path) -> None:
    corrupt = _learned(tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=re.escape(str(corrupt)) + "'.*model.safetensors is not readable"):
        load_reward(str(corrupt))
    not_object = _learned(tmp_path / "config-list")
    (not_object / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"config-list'.*bad config\.json.*expected a JSON object"):
        load_reward(str(not_object))


def test_penalised_needs_an_ensemble_folder(tmp_path: Path) -> None:
    with pytest.raises(RewardSpecError, match="no folder given"):
        load_reward("penalised:")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RewardSpecError, match="not a reward ensemble folder"):
        load_reward(f"penalised:{tmp_path / 'plain'}")
