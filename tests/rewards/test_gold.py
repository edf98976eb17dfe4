"""Gold rewards of the Shapes world: protocol, names, agreement with the GenEval verdict and the panel."""

from __future__ import annotations

import pytest
import torch

from diffalign.rewards.gold import GroupUtility, ShapesFaithfulness, ShapesQuality, gold_rewards
from diffalign.rewards.protocol import Reward
from diffalign.world.dataset import ShapesGenerator
from diffalign.world.geneval import score_image
from diffalign.world.grammar import GrammarError, parse_prompt
from diffalign.world.raters import RaterPanel


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, list[str]]:
    torch.set_num_threads(1)
    b = ShapesGenerator().sample(24, torch.Generator().manual_seed(2))
    prompts = [p if i % 2 else b.prompts[(i + 5) % 24] for i, p in enumerate(b.prompts)]
    return b.images, prompts


def test_faithfulness_is_the_geneval_verdict(batch):
    images, prompts = batch
    reward = ShapesFaithfulness()
    out = reward(images, prompts)
    expected = [
        float(score_image(img.permute(1, 2, 0).double().numpy(), parse_prompt(p)).correct)
        for img, p in zip(images, prompts)
    ]
    assert out.dtype == torch.float32 and out.shape == (24,)
    assert out.tolist() == expected
    assert 0 < sum(expected) < 24
    partial = ShapesFaithfulness(partial=True)(images, prompts)
    assert torch.all(partial >= out) and torch.all(partial[out == 1] == 1)
    assert torch.all((partial >= 0) & (partial <= 1))


def test_names_protocol_and_errors(batch):
    images, prompts = batch
    panel = RaterPanel()
    rewards = gold_rewards(panel)
    assert set(rewards) == {
        "gold-faithfulness",
        "gold-faithfulness:partial",
        "gold-quality",
        "gold-utility",
        "gold-utility:bold",
        "gold-utility:calm",
    }
    for name, reward in rewards.items():
        assert isinstance(reward, Reward) and reward.name == name and not reward.differentiable
    with pytest.raises(ValueError, match="group"):
        GroupUtility(panel, "nobody")
    with pytest.raises(ValueError, match="gold-faithfulness"):
        ShapesFaithfulness()(images[:2], prompts[:3])
    with pytest.raises(GrammarError, match="a photo of a dog"):
        ShapesFaithfulness()(images[:1], ["a photo of a dog"])


def test_utilities_are_the_panels(batch):
    images, prompts = batch
    panel = RaterPanel()
    features = panel.features(images[:8], prompts[:8])
    pooled = GroupUtility(panel)(images[:8], prompts[:8])
    assert torch.allclose(pooled.double(), panel.utility(features), atol=1e-6)
    for g in panel.groups:
        got = GroupUtility(panel, g)(images[:8], prompts[:8])
        assert torch.allclose(got.double(), panel.utility(features, group=g), atol=1e-6)
    quality = ShapesQuality(panel)(images[:8], prompts[:8])
    assert torch.allclose(quality.double(), features.quality, atol=1e-6)


def test_correct_image_scores_higher_utility(batch):
    images, prompts = batch
    panel = RaterPanel()
    faith = ShapesFaithfulness()(images, prompts)
    util = GroupUtility(panel)(images, prompts)
    assert float(util[faith == 1].mean()) > float(util[faith == 0].mean()) + 0.3
