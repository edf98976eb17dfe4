"""Prompt-set readers on small files the tests write; malformed files name the file and the row."""

from __future__ import annotations

import json

import pytest

from diffalign.evaluate.prompt_sets import PromptSetError, read_prompt_set, world_prompts


def test_partiprompts_tsv(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(
        "Prompt\tCategory\tChallenge\tNote\n"
        "bond\tAbstract\tBasic\t\n"
        "a red apple on a table\tFood & Beverage\tColors\tfrom DrawBench\n",
        encoding="utf-8",
    )
    ps = read_prompt_set(path)
    assert ps.name == "parti"
    assert ps.prompts == ["bond", "a red apple on a table"]
    assert ps.categories == ["Abstract", "Food & Beverage"]
    assert ps.extra["challenge"] == ["Basic", "Colors"]


def test_drawbench_csv_with_quoted_commas(tmp_path):
    path = tmp_path / "drawbench.csv"
    path.write_text(
        'Prompts,Category\nA red colored car.,Colors\n"One cat, two dogs.",Counting\n', encoding="utf-8"
    )
    ps = read_prompt_set(path)
    assert ps.prompts == ["A red colored car.", "One cat, two dogs."]
    assert ps.by_category() == {"Colors": ["A red colored car."], "Counting": ["One cat, two dogs."]}


def test_hpsv2_folder_reads_every_style_present(tmp_path):
    (tmp_path / "anime.json").write_text(json.dumps(["a fox in a forest", "a robot"]), encoding="utf-8")
    (tmp_path / "photo.json").write_text(json.dumps(["a dog on a sofa"]), encoding="utf-8")
    ps = read_prompt_set(tmp_path)
    assert ps.prompts == ["a fox in a forest", "a robot", "a dog on a sofa"]
    assert ps.categories == ["anime", "anime", "photo"]
    single = read_prompt_set(tmp_path / "photo.json")
    assert single.prompts == ["a dog on a sofa"] and single.categories == ["photo"]


def test_geneval_metadata_jsonl_reads_prompts_and_tags(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    records = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "color_attr", "include": [], "prompt": "a photo of a red bowl and a green cup"},
        {"include": [], "prompt": "no tag here"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    ps = read_prompt_set(path)
    assert ps.name == "geneval"
    assert ps.prompts == [r["prompt"] for r in records]
    assert ps.categories == ["single_object", "color_attr", ""]
    # what `diffalign shapeseval prompts` writes is read the same way
    from diffalign.world.shapeseval import build_shapeseval, to_jsonl

    lines = build_shapeseval()
    out = tmp_path / "shapeseval.jsonl"
    out.write_text(to_jsonl(lines), encoding="utf-8")
    ours = read_prompt_set(out)
    assert ours.prompts == [m["prompt"] for m in lines] and "color_attr" in ours.categories
    for body, message in [
        ('{"prompt": "ok"}\n{"tag": "x"}\n', "line 2"),
        ("not json\n", "line 1: not valid JSON"),
    ]:
        path.write_text(body, encoding="utf-8")
        with pytest.raises(PromptSetError, match=message):
            read_prompt_set(path)


def test_text_file_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n a dog \n", encoding="utf-8")
    assert read_prompt_set(path).prompts == ["a cat", "a dog"]


def test_malformed_files_name_file_and_row(tmp_path):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\tNote\nok\tA\tB\tC\nshort\tA\n", encoding="utf-8")
    with pytest.raises(PromptSetError, match=r"bad\.tsv, row 3"):
        read_prompt_set(tsv)
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("Prompt,Category\nx,y\n", encoding="utf-8")
    with pytest.raises(PromptSetError, match=r"bad\.csv.*Prompts"):
        read_prompt_set(csv_path)
    empty_prompt = tmp_path / "empty.csv"
    empty_prompt.write_text("Prompts,Category\n ,Colors\n", encoding="utf-8")
    with pytest.raises(PromptSetError, match=r"empty\.csv, row 2"):
        read_prompt_set(empty_prompt)
    js = tmp_path / "photo.json"
    js.write_text(json.dumps(["fine", 3]), encoding="utf-8")
    with pytest.raises(PromptSetError, match=r"photo\.json, item 1"):
        read_prompt_set(js)
    with pytest.raises(PromptSetError, match=r"missing\.tsv"):
        read_prompt_set(tmp_path / "missing.tsv")


def test_world_prompts_are_seeded_world_prompts():
    first = world_prompts(20, seed=3)
    assert first == world_prompts(20, seed=3)
    assert first != world_prompts(20, seed=4)
    assert all(isinstance(p, str) and p for p in first)
