"""The differentiable relaxation of the grader: agreement with the grader, clauses, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffalign.rewards.gold import ShapesFaithfulness
from diffalign.rewards.protocol import require_differentiable
from diffalign.rewards.registry import load_reward
from diffalign.rewards.soft_faithfulness import (
    SoftFaithfulness,
    SoftFaithfulnessConfig,
    colour_ink,
    template_bank,
)
from diffalign.world import GrammarError, Scene, SceneBatch, SceneObject, ShapesGenerator, render_batch
from diffalign.world.palette import PALETTE


@pytest.fixture(scope="module")
def soft() -> SoftFaithfulness:
    return SoftFaithfulness()


def render(*scenes: list[SceneObject]) -> torch.Tensor:
    return render_batch(SceneBatch.from_scenes([Scene(tuple(objects)) for objects in scenes]))


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def test_template_bank_shapes_and_balance() -> None:
    config = SoftFaithfulnessConfig(radii=(3.0, 4.0), square_rotations=3, triangle_rotations=4, phases=2)
    bank = template_bank(config)
    assert bank.kernels.shape[0] == 4 * 2 * (1 + 3 + 4)  # 4 sub-pixel phases x 2 radii x 8 shapes
    assert bank.classes.tolist().count(0) == 4 * 2 and bank.classes.tolist().count(2) == 4 * 8
    # Coverage in [0, 1], the shape's area (pi r^2 in pixels) and a support that holds it.
    assert bank.kernels.min() >= 0 and bank.kernels.max() <= 1
    radii = torch.tensor([3.0] * 8 + [4.0] * 8).repeat(4)
    torch.testing.assert_close(bank.kernels.sum((1, 2, 3)), torch.pi * radii**2, rtol=0.05, atol=0)
    assert (bank.supports >= bank.kernels).all()
    assert (bank.supports.sum((1, 2, 3)) > bank.kernels.sum((1, 2, 3))).all()
    # Phases are the same shapes shifted by a fraction of a pixel.
    first, shifted = bank.kernels[0, 0], bank.kernels[len(bank.kernels) // 4, 0]
    assert not torch.allclose(first, shifted)
    torch.testing.assert_close(first.sum(), shifted.sum(), rtol=0.02, atol=0)


def test_colour_ink_reads_palette_colours_and_white() -> None:
    palette = torch.tensor(list(PALETTE.values())) / 255.0
    pixels = torch.cat([palette, torch.ones(1, 3), torch.tensor([[0.0, 0.0, 0.0]])])  # colours, white, black
    ink = colour_ink(pixels.T.reshape(1, 3, 1, -1), temperature=0.01)[0, :, 0]  # [C, pixels]
    n = len(palette)
    torch.testing.assert_close(ink[:, :n], torch.eye(n), atol=1e-2, rtol=0)
    assert ink[:, n].abs().max() < 1e-3  # white has no ink
    assert ink[:, n + 1].max() < 0.05  # black is no palette blend (the detector's residual test)


def test_agrees_with_the_grader_on_renderings(soft: SoftFaithfulness) -> None:
    batch = ShapesGenerator().sample(96, torch.Generator().manual_seed(3))
    own = soft(batch.images, batch.prompts)
    assert own.mean() > 0.8
    shifted = batch.prompts[1:] + batch.prompts[:1]  # mostly wrong prompts for each image
    gold = ShapesFaithfulness()(batch.images, shifted)
    assert 0 < gold.sum() < len(gold)
    assert auc(soft(batch.images, shifted), gold) > 0.9


def test_counts_are_exact(soft: SoftFaithfulness) -> None:
    two = [SceneObject("circle", "red", 0.25, 0.5, 0.11), SceneObject("circle", "blue", 0.75, 0.5, 0.11)]
    three = [*two, SceneObject("circle", "green", 0.5, 0.2, 0.11)]
    scores = soft(render(two, three), ["two circles", "two circles"])
    assert scores[0] > 0.9 and scores[1] < 0.6  # the third circle breaks "exactly two"
    assert soft(render(three), ["three circles"])[0] > 0.9


def test_position_and_colour_clauses(soft: SoftFaithfulness) -> None:
    scene = [SceneObject("circle", "red", 0.25, 0.5, 0.12), SceneObject("square", "blue", 0.75, 0.5, 0.12)]
    image = render(scene, scene)
    left, right = soft(image, ["a circle left of a square", "a circle right of a square"])
    assert left > right + 0.15  # the pair in the right relation exists only for "left of"
    right_colours, swapped = soft(image, ["a red circle and a blue square", "a blue circle and a red square"])
    assert right_colours > swapped + 0.3


def test_other_image_sizes_are_resampled(soft: SoftFaithfulness) -> None:
    batch = ShapesGenerator().sample(8, torch.Generator().manual_seed(4))
    large = F.interpolate(batch.images, scale_factor=2, mode="nearest")
    expected = soft(batch.images, batch.prompts)
    torch.testing.assert_close(soft(large, batch.prompts), expected, atol=1e-4, rtol=0)


def test_gradient_reaches_white_pixels(soft: SoftFaithfulness) -> None:
    images = torch.ones(2, 3, 32, 32, requires_grad=True)
    soft(images, ["a red circle", "two squares"]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert (images.grad.abs().sum((1, 2, 3)) > 0).all()  # the clip passes gradients straight through


def test_ascent_on_the_relaxation_draws_what_the_grader_accepts(soft: SoftFaithfulness) -> None:
    """Pixel-space gradient ascent from noisy white canvases ends at images the grader accepts."""
    prompts = ["a blue square", "two triangles", "three squares", "a red circle"]
    torch.manual_seed(0)
    images = (1 + 0.05 * torch.randn(len(prompts), 3, 32, 32)).requires_grad_()
    gold = ShapesFaithfulness()
    assert gold(images.detach().clamp(0, 1), prompts).sum() == 0
    optimiser = torch.optim.Adam([images], lr=0.05)
    for _ in range(60):
        optimiser.zero_grad()
        (-soft(images, prompts).sum()).backward()
        optimiser.step()
        with torch.no_grad():
            images.clamp_(0, 1)
    assert gold(images.detach(), prompts).tolist() == [1.0] * len(prompts)


def test_registry_and_errors(soft: SoftFaithfulness) -> None:
    reward = load_reward("shapes:faithfulness-soft")
    assert isinstance(reward, SoftFaithfulness)
    require_differentiable(reward, "reward guidance")
    with pytest.raises(GrammarError):
        soft(torch.ones(1, 3, 32, 32), ["a photo of a cat"])
    with pytest.raises(ValueError, match="temperature"):
        SoftFaithfulnessConfig(temperature=0)
    with pytest.raises(ValueError, match="radii"):
        SoftFaithfulnessConfig(radii=())
