"""`--reward` resolution: gold names and aliases, external names, folders, callables, and clear errors."""

from __future__ import annotations

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
