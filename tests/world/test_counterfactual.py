"""Counterfactual scenes fail their prompts under the world's own grader, and keep everything else."""

import pytest
import torch

from diffalign.world.counterfactual import TASKS, counterfactual_scenes, relation_clearly_fails
from diffalign.world.dataset import ShapesGenerator
from diffalign.world.geneval import score_image

torch.set_num_threads(1)


def _batch(per_task: int, seed: int = 0):
    world = ShapesGenerator()
    tags = [m["tag"] for m in world.metadata]
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for tag in TASKS:
        of_task = torch.tensor([i for i, t in enumerate(tags) if t == tag])
        ids.append(of_task[torch.randint(len(of_task), (per_task,), generator=gen)])
    ids = torch.cat(ids)
    scenes = world.scenes_for(ids, gen)
    return world, tags, ids, scenes, gen


def test_every_counterfactual_fails_its_prompt_and_every_original_passes():
    world, tags, ids, scenes, gen = _batch(per_task=16)
    edited = counterfactual_scenes(scenes, ids, tags, world.template, world.config.layout, gen)
    original, broken = world.render(scenes), world.render(edited)
    for k, i in enumerate(ids.tolist()):
        meta = world.metadata[i]
        assert score_image(original[k], meta).correct, meta["prompt"]
        verdict = score_image(broken[k], meta)
        assert not verdict.correct, f"counterfactual for {meta['prompt']!r} passes the grader"


def test_edits_change_only_what_the_task_is_about():
    world, tags, ids, scenes, gen = _batch(per_task=32, seed=1)
    edited = counterfactual_scenes(scenes, ids, tags, world.template, world.config.layout, gen)
    batch_tags = [tags[i] for i in ids.tolist()]
    for k, tag in enumerate(batch_tags):
        same_layout = torch.equal(scenes.x[k], edited.x[k]) and torch.equal(scenes.y[k], edited.y[k])
        if tag in ("colors", "color_attr"):
            assert same_layout and torch.equal(scenes.shape[k], edited.shape[k])
            assert not torch.equal(scenes.color[k], edited.color[k])
        elif tag == "position":
            # the same objects in the same colours, somewhere else
            assert torch.equal(scenes.shape[k], edited.shape[k]) and torch.equal(
                scenes.color[k], edited.color[k]
            )
            assert not same_layout
        elif tag == "counting":
            assert int((edited.shape[k] >= 0).sum()) == int((scenes.shape[k] >= 0).sum()) - 1
    position = torch.tensor([k for k, t in enumerate(batch_tags) if t == "position"])
    assert relation_clearly_fails(edited, position, world.template.relation[ids[position]]).all()
    assert not relation_clearly_fails(scenes, position, world.template.relation[ids[position]]).any()


def test_counterfactuals_are_seeded_and_the_input_is_left_alone():
    world, tags, ids, scenes, _ = _batch(per_task=8, seed=2)
    before = scenes.x.clone(), scenes.color.clone()
    first = counterfactual_scenes(
        scenes, ids, tags, world.template, world.config.layout, torch.Generator().manual_seed(5)
    )
    again = counterfactual_scenes(
        scenes, ids, tags, world.template, world.config.layout, torch.Generator().manual_seed(5)
    )
    for field in ("shape", "color", "x", "y", "size"):
        assert torch.equal(getattr(first, field), getattr(again, field))
    assert torch.equal(scenes.x, before[0]) and torch.equal(scenes.color, before[1])


def test_a_task_without_an_edit_is_refused_by_name():
    world, tags, ids, scenes, gen = _batch(per_task=1)
    renamed = ["texture"] * len(tags)
    with pytest.raises(ValueError, match="texture"):
        counterfactual_scenes(scenes, ids, renamed, world.template, world.config.layout, gen)
