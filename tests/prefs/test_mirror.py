"""Mirror augmentation: flips, the exchanged spatial words, and the labels it keeps in the Shapes world."""

import pytest
import torch

from diffalign.prefs.mirror import (
    HORIZONTAL_WORDS,
    VERTICAL_WORDS,
    draw_mirrors,
    exchange_words,
    mirror_images,
    mirror_prompt,
    mirror_prompts,
)
from diffalign.world.dataset import DatasetConfig, ShapesGenerator
from diffalign.world.raters import RaterPanel

torch.set_num_threads(1)


def test_the_spatial_words_are_exchanged_as_whole_words():
    assert (
        mirror_prompt("a red circle left of a blue square", True, False)
        == "a red circle right of a blue square"
    )
    assert (
        mirror_prompt("a red circle left of a blue square", False, True)
        == "a red circle left of a blue square"
    )
    assert mirror_prompt("a circle Above a square", False, True) == "a circle below a square"
    assert mirror_prompt("the top shape, right of the bottom one", True, True) == (
        "the bottom shape, left of the top one"
    )
    assert exchange_words("leftover brightness", HORIZONTAL_WORDS) == "leftover brightness"
    assert exchange_words("above-below", VERTICAL_WORDS) == "below-above"


def test_mirror_images_flips_the_flagged_rows_only():
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, 3, 2, 2)
    flips = torch.tensor([[False, False], [True, False], [False, True], [True, True]])
    out = mirror_images(images, flips)
    assert out.dtype == torch.uint8 and not torch.equal(out, images)
    assert torch.equal(out[0], images[0])
    assert torch.equal(out[1], images[1].flip(-1))
    assert torch.equal(out[2], images[2].flip(-2))
    assert torch.equal(out[3], images[3].rot90(2, (-2, -1)))
    assert torch.equal(images[1], torch.arange(12, 24, dtype=torch.uint8).view(3, 2, 2))  # input untouched
    assert mirror_prompts(["left", "above"], flips[2:]) == ["left", "below"]
    with pytest.raises(ValueError, match="3 images but 4 rows"):
        mirror_images(images[:3], flips)
    drawn = draw_mirrors(4000, torch.Generator().manual_seed(0))
    assert drawn.shape == (4000, 2) and abs(drawn.float().mean().item() - 0.5) < 0.03


def test_mirrored_shapes_images_keep_the_graders_verdict_and_the_panels_utility():
    world = ShapesGenerator(
        DatasetConfig(category_weights={"position": 3.0, "counting": 1.0, "color_attr": 1.0})
    )
    g = torch.Generator().manual_seed(0)
    batch = world.sample(48, g)
    # half of the images drawn for another prompt, so that verdicts of both kinds are checked
    others = world.render(world.scenes_for(world.sample_prompt_ids(48, g), g))
    images = torch.cat([batch.images[:24], others[24:]])
    panel = RaterPanel()
    before = panel.features(images, batch.prompts)
    flips = torch.tensor([[True, False], [False, True], [True, True]]).repeat(16, 1)
    after = panel.features(mirror_images(images, flips), mirror_prompts(batch.prompts, flips))
    assert before.correct.any() and not before.correct.all()
    assert torch.equal(after.correct, before.correct)
    assert torch.allclose(after.faithfulness, before.faithfulness)
    assert torch.allclose(after.quality, before.quality, atol=1e-6)
    assert torch.allclose(after.taste, before.taste, atol=1e-6)
    # the exchange of words is what keeps the verdict: flipped images under the old prompts lose it
    unexchanged = panel.features(mirror_images(images, flips), batch.prompts)
    assert not torch.equal(unexchanged.correct, before.correct)
