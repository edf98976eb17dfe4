"""`evaluate_suite` on a tiny 16x16 model: every block present and consistent with direct computations."""

from __future__ import annotations

import pytest
import torch

from diffalign.diffusion.sampling import SamplerConfig, sample
from diffalign.evaluate.suite import evaluate_suite, reward_summary
from diffalign.models.tiny import TinyDiffusionModel
from tests.align.helpers import save_tiny_model


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return TinyDiffusionModel.load(save_tiny_model(tmp_path_factory.mktemp("m") / "model", "epsilon"))


def test_suite_against_itself(tiny):
    prompts = ["a red circle", "a blue square", "a red circle", "a blue square"]
    config = SamplerConfig(sampler="ddim", num_steps=3, eta=1.0)
    out = evaluate_suite(
        tiny,
        prompts,
        config,
        rewards={"brightness": brightness},
        baseline=tiny,
        base=tiny,
        batch_size=4,
        n_boot=200,
    )
    # the same model, prompts and seeds: identical images, so every pair is a tie
    assert out["win_rate"]["win_rate"] == pytest.approx(0.5)
    assert out["win_rate"]["judge"] == "panel"
    assert out["kl"]["kl"] == pytest.approx(0.0, abs=1e-6)
    # the reward block is the mean over the suite's own samples (seeds 0..3)
    images = sample(tiny, prompts, config=config, seeds=[0, 1, 2, 3]).images
    assert out["rewards"]["brightness"]["mean"] == pytest.approx(
        float(brightness(images, prompts).mean()), rel=1e-5
    )
    assert out["diversity"]["pixel"]["per_prompt"] > 0
    assert out["fid"]["n_real"] == 4 and out["fid"]["fid"] > 0


def test_suite_reward_judge_and_errors(tiny):
    config = SamplerConfig(sampler="ddim", num_steps=2, eta=0.0)
    out = evaluate_suite(
        tiny,
        ["a red circle"] * 2,
        config,
        baseline=tiny,
        judge=brightness,
        diversity=False,
        fid=False,
        n_boot=50,
    )
    assert out["win_rate"]["win_rate"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="base"):
        evaluate_suite(tiny, ["a", "b"], config, base=tiny, diversity=False, fid=False)
    with pytest.raises(ValueError, match="reference_images"):
        evaluate_suite(tiny, ["red red circle", "blue blue square"], config, diversity=False)


def test_reward_summary_interval_is_over_prompts():
    values = torch.tensor([1.0, 1.0, 0.0, 0.0])
    summary = reward_summary(values, ["a", "a", "b", "b"], n_boot=500)
    assert summary["mean"] == 0.5
    assert summary["ci95"] == [0.0, 1.0]
