import numpy as np
import torch

from diffalign.world.dataset import ShapesGenerator, write_dataset
from diffalign.world.palette import PALETTE
from diffalign.world.render import render_batch, render_scene
from diffalign.world.scene import BOUNDING_RADIUS, Scene, SceneObject


def test_render_is_deterministic_and_batch_independent():
    gen = ShapesGenerator()
    a = gen.sample(64, torch.Generator().manual_seed(3))
    b = gen.sample(64, torch.Generator().manual_seed(3))
    assert a.prompts == b.prompts
    assert torch.equal(a.images, b.images)
    alone = render_batch(a.scenes.select(slice(5, 6)))
    assert torch.allclose(alone[0], a.images[5], atol=1e-6)


def test_render_colours_area_and_anti_aliasing():
    size = 0.15
    scene = Scene((SceneObject("circle", "blue", 0.5, 0.5, size),))
    image = render_scene(scene, 64).astype(np.float64) / 255
    # the centre pixel is the palette colour, corners are white
    assert np.allclose(image[32, 32] * 255, PALETTE["blue"], atol=1)
    assert np.allclose(image[0, 0], 1.0)
    # coverage integrates to the circle's area (equal-area radius)
    white = np.ones(3)
    colour = np.asarray(PALETTE["blue"]) / 255
    alpha = ((white - image) @ (white - colour)) / ((white - colour) @ (white - colour))
    assert abs(alpha.sum() - np.pi * (size * 64) ** 2) < 0.01 * np.pi * (size * 64) ** 2
    # anti-aliased: some edge pixels are strictly between background and colour
    assert ((alpha > 0.1) & (alpha < 0.9)).sum() > 10


def test_equal_area_shapes():
    areas = {}
    for shape in ("circle", "square", "triangle"):
        image = render_scene(Scene((SceneObject(shape, "red", 0.5, 0.5, 0.2),)), 128).astype(np.float64) / 255
        areas[shape] = (1 - image[..., 1]).sum()  # green channel drops from 1 to 40/255 inside
    assert max(areas.values()) / min(areas.values()) < 1.01


def test_generator_scenes_are_valid_and_satisfy_relations():
    gen = ShapesGenerator()
    batch = gen.sample(512, torch.Generator().manual_seed(0))
    for scene, pid in zip(batch.scenes.to_scenes(), batch.prompt_ids.tolist()):
        meta = gen.metadata[pid]
        assert len(scene.objects) == sum(c["count"] for c in meta["include"])
        for i, a in enumerate(scene.objects):
            ra = a.size * BOUNDING_RADIUS[a.shape]
            assert ra <= a.x <= 1 - ra and ra <= a.y <= 1 - ra
            for b in scene.objects[i + 1 :]:
                rb = b.size * BOUNDING_RADIUS[b.shape]
                assert np.hypot(a.x - b.x, a.y - b.y) >= ra + rb
        if meta["tag"] == "position":
            rel = meta["include"][1]["position"][0]
            ref, obj = scene.objects
            dx, dy = obj.x - ref.x, obj.y - ref.y
            assert {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[rel]


def test_write_dataset(tmp_path):
    out = write_dataset(tmp_path / "ds", 300, seed=1, batch_size=128)
    images = np.load(out / "images.npy")
    lines = (out / "examples.jsonl").read_text().splitlines()
    assert images.shape == (300, 32, 32, 3) and images.dtype == np.uint8
    assert len(lines) == 300


def test_sizes_and_counts_that_cannot_be_drawn_are_refused(tmp_path):
    import pytest

    from diffalign.world.dataset import DatasetConfig, ShapesGenerator, write_dataset
    from diffalign.world.render import render_scene
    from diffalign.world.scene import Scene, SceneObject

    scene = Scene((SceneObject("circle", "red", 0.5, 0.5, 0.2),))
    for size in (0, -5):  # 0 drew an empty image, -5 failed inside torch
        with pytest.raises(ValueError, match="canvas size"):
            render_scene(scene, size)
    with pytest.raises(ValueError, match="canvas size"):
        ShapesGenerator(DatasetConfig(canvas_size=0))
    with pytest.raises(ValueError, match="canvas size"):
        write_dataset(tmp_path / "zero", 2, config=DatasetConfig(canvas_size=0))
    with pytest.raises(ValueError, match="number of examples"):
        write_dataset(tmp_path / "negative", -2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        write_dataset(tmp_path / "file", 2)
    assert not (tmp_path / "zero").exists() and not (tmp_path / "negative").exists()
