"""FID/KID with the shipped Shapes feature extractor: ~0 for a set against itself, growing with a shift."""

from __future__ import annotations

import pytest
import torch

from diffalign.evaluate.features import WEIGHTS_PATH, load_feature_net, scene_targets
from diffalign.evaluate.fid import fid_kid, inception_fid
from diffalign.world.dataset import ShapesGenerator


@pytest.fixture(scope="module")
def world_images():
    torch.set_num_threads(1)
    gen = ShapesGenerator()
    return gen.sample(300, torch.Generator().manual_seed(0)), gen.sample(
        300, torch.Generator().manual_seed(1)
    )


@pytest.fixture(scope="module")
def net():
    return load_feature_net()


def test_shipped_extractor_reads_scene_content(world_images, net):
    batch, _ = world_images
    with torch.no_grad():
        pred = net.predict(batch.images)
    target = scene_targets(batch.scenes)
    counts_right = (pred[:, :-2].round() == target[:, :-2]).float().mean()
    assert counts_right > 0.85  # a random network gets well under half
    assert net(batch.images[:2]).shape == (2, net.num_features)
    # uint8 and float inputs give the same features
    u8 = (batch.images[:4] * 255).round().to(torch.uint8)
    assert torch.allclose(net(u8), net(u8.float() / 255), atol=1e-5)


def test_fid_of_a_set_against_itself_is_near_zero(world_images, net):
    batch, _ = world_images
    out = fid_kid(batch.images, batch.images, net, kid_subset_size=100, kid_subsets=20)
    assert abs(out["fid"]) < 1e-3
    # KID draws its real and fake subsets independently: 0 within its Monte Carlo error
    assert abs(out["kid_mean"]) < 4 * out["kid_std"] / 20**0.5


def test_fid_and_kid_grow_with_a_colour_shift(world_images, net):
    real, other = world_images
    # Two independent draws of the world: a small FID (the finite-sample floor).
    floor = fid_kid(real.images, other.images, net, kid_subset_size=100, kid_subsets=20)
    values = []
    for amount in (0.1, 0.2, 0.4):
        shifted = other.images * (1 - amount)  # darker colours (white background turns grey)
        values.append(fid_kid(real.images, shifted, net, kid_subset_size=100, kid_subsets=20))
    fids = [v["fid"] for v in values]
    kids = [v["kid_mean"] for v in values]
    assert floor["fid"] < fids[0] < fids[1] < fids[2]
    assert floor["kid_mean"] < kids[0] < kids[1] < kids[2]


def test_fid_grows_with_a_position_shift(world_images, net):
    real, other = world_images
    fids = [
        fid_kid(
            real.images, torch.roll(other.images, shifts=s, dims=3), net, kid_subset_size=100, kid_subsets=10
        )["fid"]
        for s in (0, 4, 10)
    ]
    assert fids[0] < fids[1] < fids[2]


def test_bad_inputs_and_missing_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match="fake"):
        fid_kid(torch.rand(4, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        load_feature_net(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        inception_fid(torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), tmp_path / "missing.pth")
    assert WEIGHTS_PATH.is_file()
