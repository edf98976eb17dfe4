"""Counterfactual scenes: a prompt's own scene, edited so that it no longer satisfies the prompt.

A preference pair shows two images of one prompt, which usually hold the same objects and differ in
one detail: the relation, which object carries which colour, one object too few. Contrasting a
prompt's scene with another prompt's scene (`diffalign.rewards.bt_training.MatchingBatches`) teaches
such details only through whatever else differs between the two scenes (layout, colours drawn at
random), and a model can pass those pairs without reading the relation at all. Hard negatives built
by editing the positive itself remove that shortcut; this is the construction of NegCLIP
(Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words"), with
scene edits in place of caption edits.

The edit depends on the prompt's GenEval task (`tag`):

- ``position``: half the time the layout is mirrored along the relation's axis (the relation is
  reversed); otherwise the same objects are laid out afresh until the relation clearly fails
  GenEval's rule (`POSITION_THRESHOLD`, with the cosine held below 0.5 - `POSITION_SLACK`), which
  also yields the side-by-side and diagonal failures of real samples.
- ``color_attr``: half the time the two objects exchange colours (the binding error); otherwise one
  of them takes a colour the prompt does not name.
- ``colors``: the object takes another colour.
- ``counting``: one object is removed (counts are exact, so one fewer fails).
- ``two_object``: one object is removed or takes the other object's shape.
- ``single_object``: the object takes another shape.

Every edited scene fails its prompt under the world's own grader (`diffalign.world.geneval`); a test
renders them and checks it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.world.geneval import POSITION_THRESHOLD
from diffalign.world.palette import COLORS, RELATIONS, SHAPES
from diffalign.world.scene import (
    BOX_DIMS,
    LayoutConfig,
    SceneBatch,
    SlotTemplate,
    relation_holds,
    sample_layout,
)

# A re-laid-out negative must miss GenEval's cosine of 0.5 by this much, so that the grader's
# detected centroids (a pixel or so from the scene's) cannot turn it into a positive.
POSITION_SLACK = 0.1
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def counterfactual_scenes(
    scenes: SceneBatch,
    prompt_ids: Tensor,
    tags: Sequence[str],
    template: SlotTemplate,
    layout: LayoutConfig,
    generator: torch.Generator,
) -> SceneBatch:
    """Edited copies of `scenes` (drawn for `prompt_ids`) that fail their prompts; see the module doc.

    Args:
        scenes: scenes that satisfy their prompts, as `ShapesGenerator.scenes_for` draws them.
        prompt_ids: [B] the prompt of each scene (indices into `tags` and `template`).
        tags: the GenEval task of every prompt of the world.
        template: the world's slot templates (`templates_from_metadata`), for the required relation.
        layout: the world's layout rules (sizes, gaps, canvas margin) for re-laid-out scenes.
        generator: the random stream (CPU).
    """
    out = scenes.clone()
    ids = prompt_ids.cpu()
    batch_tags = [tags[int(i)] for i in ids]
    unknown = set(batch_tags) - set(TASKS)
    if unknown:
        raise ValueError(f"no counterfactual edit for task(s) {sorted(unknown)}; expected one of {TASKS}")
    coin = torch.rand(len(ids), generator=generator) < 0.5
    for tag in TASKS:
        rows = torch.tensor([i for i, t in enumerate(batch_tags) if t == tag], dtype=torch.long)
        if len(rows) == 0:
            continue
        edit = _EDITS[tag]
        edit(out, rows, coin[rows], template.relation[ids[rows]], layout, generator)
    return out


def _random_other(current: Tensor, n_values: int, generator: torch.Generator) -> Tensor:
    """A value in [0, n_values) different from each entry of `current`."""
    shift = torch.randint(1, n_values, current.shape, generator=generator)
    return (current + shift) % n_values


def _edit_single_object(scenes, rows, coin, relation, layout, generator) -> None:
    scenes.shape[rows, 0] = _random_other(scenes.shape[rows, 0], len(SHAPES), generator)


def _edit_colors(scenes, rows, coin, relation, layout, generator) -> None:
    scenes.color[rows, 0] = _random_other(scenes.color[rows, 0], len(COLORS), generator)


def _remove_one(scenes: SceneBatch, rows: Tensor, generator: torch.Generator) -> None:
    """Empty one filled slot of each row (chosen at random)."""
    filled = (scenes.shape[rows] >= 0).float()
    slot = torch.multinomial(filled, 1, generator=generator).squeeze(1)
    scenes.shape[rows, slot] = -1
    for field in ("x", "y", "size"):
        getattr(scenes, field)[rows, slot] = 0.0


def _edit_counting(scenes, rows, coin, relation, layout, generator) -> None:
    _remove_one(scenes, rows, generator)


def _edit_two_object(scenes, rows, coin, relation, layout, generator) -> None:
    # coin: remove one object; otherwise the second takes the first's shape (two of one kind).
    if coin.any():
        _remove_one(scenes, rows[coin], generator)
    same = rows[~coin]
    scenes.shape[same, 1] = scenes.shape[same, 0]


def _edit_color_attr(scenes, rows, coin, relation, layout, generator) -> None:
    first, second = scenes.color[rows, 0].clone(), scenes.color[rows, 1].clone()
    swap = coin & (first != second)
    scenes.color[rows[swap], 0], scenes.color[rows[swap], 1] = second[swap], first[swap]
    # Otherwise one object (chosen at random) takes a colour the prompt names for neither.
    rest = rows[~swap]
    if len(rest):
        slot = torch.randint(2, (len(rest),), generator=generator)
        named = torch.stack([scenes.color[rest, 0], scenes.color[rest, 1]], dim=1)
        choice = torch.randint(len(COLORS) - 2, (len(rest),), generator=generator)
        new = torch.empty(len(rest), dtype=torch.long)
        for k in range(len(rest)):
            free = [c for c in range(len(COLORS)) if c not in named[k].tolist()]
            new[k] = free[int(choice[k]) % len(free)]
        scenes.color[rest, slot] = new


def _box(scenes: SceneBatch, rows: Tensor, slot: int) -> tuple[Tensor, Tensor]:
    shape = scenes.shape[rows, slot].clamp_min(0)
    width = torch.tensor([BOX_DIMS[s][0] for s in SHAPES])[shape] * scenes.size[rows, slot]
    height = torch.tensor([BOX_DIMS[s][1] for s in SHAPES])[shape] * scenes.size[rows, slot]
    return width, height


def relation_clearly_fails(scenes: SceneBatch, rows: Tensor, relation: Tensor) -> Tensor:
    """[len(rows)] True where slot 1 misses `relation` to slot 0 by GenEval's rule with the slack."""
    aw, ah = _box(scenes, rows, 1)
    bw, bh = _box(scenes, rows, 0)
    near_pass = relation_holds(
        scenes.x[rows, 1],
        scenes.y[rows, 1],
        aw,
        ah,
        scenes.x[rows, 0],
        scenes.y[rows, 0],
        bw,
        bh,
        relation,
        POSITION_THRESHOLD,
        0.5 - POSITION_SLACK,
    )
    return ~near_pass


def _edit_position(scenes, rows, coin, relation, layout, generator) -> None:
    # coin: mirror the layout along the relation's axis (x for left/right, y for above/below).
    horizontal = relation < RELATIONS.index("above")
    mirror = rows[coin]
    flip_x = mirror[horizontal[coin]]
    flip_y = mirror[~horizontal[coin]]
    scenes.x[flip_x] = torch.where(scenes.shape[flip_x] >= 0, 1 - scenes.x[flip_x], scenes.x[flip_x])
    scenes.y[flip_y] = torch.where(scenes.shape[flip_y] >= 0, 1 - scenes.y[flip_y], scenes.y[flip_y])
    # Otherwise: the same objects, laid out afresh until the relation clearly fails.
    pending, pending_rel = rows[~coin], relation[~coin]
    free = torch.full_like(pending_rel, -1)
    for _ in range(layout.max_tries):
        if len(pending) == 0:
            return
        x, y, size = sample_layout(scenes.shape[pending], free, layout, generator)
        scenes.x[pending], scenes.y[pending], scenes.size[pending] = x, y, size
        fails = relation_clearly_fails(scenes, pending, pending_rel)
        pending, pending_rel, free = pending[~fails], pending_rel[~fails], free[~fails]
    raise RuntimeError(f"could not lay out {len(pending)} position counterfactual(s) that fail the relation")


_EDITS = {
    "single_object": _edit_single_object,
    "two_object": _edit_two_object,
    "counting": _edit_counting,
    "colors": _edit_colors,
    "position": _edit_position,
    "color_attr": _edit_color_attr,
}
