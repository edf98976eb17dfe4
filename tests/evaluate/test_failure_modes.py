"""Failure modes: rendered scenes with known mistakes are named by the mistake they hold."""

from __future__ import annotations

import json

import pytest

from diffalign.evaluate.failure_modes import (
    FAILURE_MODES,
    clause_failure,
    failure_modes,
    format_modes,
    image_failures,
)
from diffalign.evaluate.geneval_layout import score_folder, write_prompt_folder
from diffalign.world.geneval import score_image
from diffalign.world.grammar import parse_prompt
from diffalign.world.render import render_scene
from diffalign.world.scene import Scene
from diffalign.world.scene import SceneObject as Obj


def _modes(prompt: str, *objects: Obj) -> set[str]:
    verdict = score_image(render_scene(Scene(objects)), parse_prompt(prompt))
    modes = image_failures(verdict.to_dict())
    assert verdict.correct == (not modes)
    return modes


@pytest.mark.parametrize(
    ("objects", "expected"),
    [
        ((Obj("circle", "red", 0.3, 0.5, 0.12), Obj("square", "blue", 0.7, 0.5, 0.12)), set()),
        ((Obj("circle", "red", 0.3, 0.5, 0.12), Obj("square", "red", 0.7, 0.5, 0.12)), {"colour_leak"}),
        ((Obj("circle", "red", 0.3, 0.5, 0.12), Obj("square", "green", 0.7, 0.5, 0.12)), {"wrong_colour"}),
        ((Obj("circle", "blue", 0.3, 0.5, 0.12), Obj("square", "red", 0.7, 0.5, 0.12)), {"colour_leak"}),
        ((Obj("circle", "red", 0.3, 0.5, 0.12),), {"missing"}),
    ],
)
def test_colour_attribution_mistakes(objects: tuple[Obj, ...], expected: set[str]) -> None:
    assert _modes("a red circle and a blue square", *objects) == expected


def test_counting_mistakes() -> None:
    def triangles(n: int) -> tuple[Obj, ...]:
        return tuple(Obj("triangle", "green", 0.2 + 0.2 * i, 0.3 + 0.15 * (i % 2), 0.08) for i in range(n))

    assert _modes("three triangles", *triangles(3)) == set()
    assert _modes("three triangles", *triangles(2)) == {"too_few"}
    assert _modes("three triangles", *triangles(4)) == {"too_many"}
    assert _modes("three triangles") == {"missing"}


def test_position_mistakes() -> None:
    left = (Obj("circle", "red", 0.25, 0.5, 0.12), Obj("square", "blue", 0.75, 0.5, 0.12))
    right = (Obj("circle", "red", 0.75, 0.5, 0.12), Obj("square", "blue", 0.25, 0.5, 0.12))
    assert _modes("a circle left of a square", *left) == set()
    assert _modes("a circle left of a square", *right) == {"wrong_relation"}
    # No square: its clause is missing, and the circle's relation has nothing to be checked against.
    alone = Obj("circle", "red", 0.5, 0.5, 0.12)
    assert _modes("a circle left of a square", alone) == {"missing", "no_target"}


def test_clause_level_modes() -> None:
    position = {"class": "circle", "count": 1, "position": ["left of", 0]}
    base = {"kind": "include", "clause": position, "held": False, "found": 1, "colors": []}
    assert clause_failure({**base, "relations": [[]]}, []) == "no_relation"
    assert clause_failure({**base, "relations": [["above"]]}, []) == "wrong_relation"
    assert clause_failure({**base, "relations": []}, []) == "no_target"
    assert clause_failure({**base, "held": True, "relations": [["left of"]]}, []) is None
    two = {"kind": "include", "clause": {"class": "square", "count": 2}, "held": False, "found": 1}
    assert clause_failure(two, []) == "too_few"
    odd = {"kind": "include", "clause": {"class": "square", "count": 1}, "held": False, "found": 1}
    with pytest.raises(ValueError, match="no failure mode"):
        clause_failure(odd, [])


def test_aggregation_shares_per_category() -> None:
    prompt = "a red circle and a blue square"
    scenes = [
        (Obj("circle", "red", 0.3, 0.5, 0.12), Obj("square", "blue", 0.7, 0.5, 0.12)),
        (Obj("circle", "red", 0.3, 0.5, 0.12), Obj("square", "red", 0.7, 0.5, 0.12)),
        (Obj("circle", "red", 0.3, 0.5, 0.12), Obj("square", "red", 0.7, 0.5, 0.12)),
        (Obj("circle", "red", 0.3, 0.5, 0.12),),
    ]
    meta = parse_prompt(prompt)
    records = [{"tag": meta["tag"], **score_image(render_scene(Scene(s)), meta).to_dict()} for s in scenes]
    summary = failure_modes(records)
    expected = {"missing": 0.25, "colour_leak": 0.5}
    assert summary == {"color_attr": {"images": 4, "failed": 3, "modes": expected}}
    assert list(summary["color_attr"]["modes"]) == [m for m in FAILURE_MODES if m in expected]
    assert format_modes(summary["color_attr"]["modes"]) == "colour_leak 0.50, missing 0.25"
    assert format_modes({}) == "-"
    wrong_but_clean = {**records[0], "correct": False, "file": "x.png"}
    with pytest.raises(ValueError, match=r"x\.png"):
        failure_modes([wrong_but_clean])


def test_score_folder_reports_failure_modes(tmp_path) -> None:
    position = parse_prompt("a circle left of a square")
    counting = parse_prompt("two squares")

    def pair(x_circle: float) -> object:
        circle = Obj("circle", "red", x_circle, 0.5, 0.12)
        return render_scene(Scene((circle, Obj("square", "blue", 1 - x_circle, 0.5, 0.12))))

    left, right = pair(0.25), pair(0.75)
    one = render_scene(Scene((Obj("square", "blue", 0.5, 0.5, 0.12),)))
    write_prompt_folder(tmp_path, 0, position, [left, right, right])
    write_prompt_folder(tmp_path, 1, counting, [one])
    results = score_folder(tmp_path, n_boot=10)
    modes = results["failure_modes"]
    assert modes["position"] == {"images": 3, "failed": 2, "modes": {"wrong_relation": pytest.approx(2 / 3)}}
    assert modes["counting"] == {"images": 1, "failed": 1, "modes": {"too_few": 1.0}}
    json.dumps(results)  # results.json stays serialisable
