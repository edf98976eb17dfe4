import json

import pytest

from diffalign.world.grammar import (
    GrammarError,
    all_metadata,
    make_metadata,
    parse_prompt,
    read_metadata_jsonl,
    validate_metadata,
)
from diffalign.world.palette import CATEGORIES
from diffalign.world.shapeseval import build_shapeseval, load_shapeseval, shipped_path, to_jsonl


def test_every_category_has_prompts_and_counts():
    counts = {tag: len(all_metadata(tag)) for tag in CATEGORIES}
    assert counts == {
        "single_object": 3,
        "two_object": 6,
        "counting": 9,
        "colors": 18,
        "position": 24,
        "color_attr": 180,
    }


@pytest.mark.parametrize("meta", all_metadata(), ids=lambda m: m["prompt"])
def test_round_trip_prompt_and_json(meta):
    assert parse_prompt(meta["prompt"]) == meta
    assert json.loads(json.dumps(meta)) == meta
    assert validate_metadata(json.loads(json.dumps(meta))) == meta


def test_geneval_schema_examples():
    pos = make_metadata("position", shape_a="circle", relation="left of", shape_b="square")
    assert pos == {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": ["left of", 0]},
        ],
        "prompt": "a circle left of a square",
    }
    count = make_metadata("counting", shape="triangle", count=3)
    assert count["include"] == [{"class": "triangle", "count": 3}]
    assert count["exclude"] == [{"class": "triangle", "count": 4}]
    assert count["prompt"] == "three triangles"
    assert make_metadata("colors", shape="circle", color="orange")["prompt"] == "an orange circle"
    attr = make_metadata("color_attr", color_a="red", shape_a="circle", color_b="blue", shape_b="square")
    assert attr["prompt"] == "a red circle and a blue square"


@pytest.mark.parametrize(
    "prompt", ["a hexagon", "two circle", "a orange circle", "five squares", "a circle near a square", ""]
)
def test_parse_rejects_outside_grammar(prompt):
    with pytest.raises(GrammarError, match="not a Shapes-world prompt"):
        parse_prompt(prompt)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"tag": "nope", "include": []}', "'tag' must be one of"),
        (
            '{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "pink"}]}',
            "color must be one of",
        ),
        ('{"tag": "counting", "include": [{"class": "circle", "count": 0}]}', "positive integer"),
        (
            '{"tag": "position", "include": [{"class": "circle", "count": 1, "position": ["left of", 0]}]}',
            "earlier include",
        ),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_metadata_lines_name_the_line(line, message):
    good = json.dumps(all_metadata("single_object")[0])
    with pytest.raises(GrammarError, match=message) as err:
        read_metadata_jsonl([good, line], source="x.jsonl")
    assert "x.jsonl line 2" in str(err.value)


def test_shapeseval_is_balanced_and_shipped_file_matches_build():
    lines = load_shapeseval()
    assert 250 <= len(lines) <= 400
    per_tag = {tag: sum(1 for m in lines if m["tag"] == tag) for tag in CATEGORIES}
    assert min(per_tag.values()) >= 45 and max(per_tag.values()) <= 60
    assert shipped_path().read_text() == to_jsonl(build_shapeseval())
    # every distinct prompt of the small tasks is present
    for tag in ("single_object", "two_object", "counting", "colors", "position"):
        assert {m["prompt"] for m in lines if m["tag"] == tag} == {m["prompt"] for m in all_metadata(tag)}
