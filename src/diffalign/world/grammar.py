"""Prompt grammar of the Shapes world and its GenEval metadata.

Every prompt belongs to one of GenEval's six task tags and carries GenEval's own metadata schema::

    {"tag": "position", "include": [{"class": "square", "count": 1},
                                    {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "prompt": "a circle left of a square"}

The templates mirror GenEval's `create_prompts.py` (without its "a photo of" prefix): two-object and
position prompts use two different shapes, colour attribution two different shapes and colours,
counting uses 2 to 4 objects and excludes count + 1 (so the count must be exact), and a position
clause points at the include entry it is relative to. The world is small, so the full set of
prompts is enumerable (`all_metadata`); `parse_prompt` inverts `prompt_for` exactly.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterable
from typing import Any

from diffalign.jsonl import json_lines
from diffalign.world.palette import (
    CATEGORIES,
    COLORS,
    MAX_COUNT,
    NUMBER_WORDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    with_article,
)

Metadata = dict[str, Any]


class GrammarError(ValueError):
    """A prompt or metadata line outside the Shapes world's grammar."""


def _clause(
    shape: str, count: int = 1, color: str | None = None, position: tuple[str, int] | None = None
) -> dict:
    clause: dict[str, Any] = {"class": shape, "count": count}
    if color is not None:
        clause["color"] = color
    if position is not None:
        clause["position"] = [position[0], position[1]]
    return clause


def make_metadata(tag: str, **kw: Any) -> Metadata:
    """Build one metadata line. Keyword arguments by tag:

    single_object: shape; two_object: shape_a, shape_b; counting: shape, count;
    colors: shape, color; position: shape_a, relation, shape_b ("a <a> <relation> a <b>");
    color_attr: color_a, shape_a, color_b, shape_b.
    """
    if tag == "single_object":
        include = [_clause(kw["shape"])]
        meta = {"tag": tag, "include": include}
    elif tag == "two_object":
        include = [_clause(kw["shape_a"]), _clause(kw["shape_b"])]
        meta = {"tag": tag, "include": include}
    elif tag == "counting":
        meta = {
            "tag": tag,
            "include": [_clause(kw["shape"], kw["count"])],
            "exclude": [_clause(kw["shape"], kw["count"] + 1)],
        }
    elif tag == "colors":
        meta = {"tag": tag, "include": [_clause(kw["shape"], color=kw["color"])]}
    elif tag == "position":
        meta = {
            "tag": tag,
            "include": [_clause(kw["shape_b"]), _clause(kw["shape_a"], position=(kw["relation"], 0))],
        }
    elif tag == "color_attr":
        meta = {
            "tag": tag,
            "include": [
                _clause(kw["shape_a"], color=kw["color_a"]),
                _clause(kw["shape_b"], color=kw["color_b"]),
            ],
        }
    else:
        raise GrammarError(f"unknown tag {tag!r}; expected one of {', '.join(CATEGORIES)}")
    meta["prompt"] = prompt_for(meta)
    validate_metadata(meta)
    return meta


def prompt_for(meta: Metadata) -> str:
    """The prompt text of a metadata line (GenEval's templates, without 'a photo of')."""
    tag, inc = meta["tag"], meta["include"]
    if tag == "single_object":
        return with_article(inc[0]["class"])
    if tag == "two_object":
        return f"{with_article(inc[0]['class'])} and {with_article(inc[1]['class'])}"
    if tag == "counting":
        return f"{NUMBER_WORDS[inc[0]['count']]} {PLURALS[inc[0]['class']]}"
    if tag == "colors":
        return with_article(f"{inc[0]['color']} {inc[0]['class']}")
    if tag == "position":
        return f"{with_article(inc[1]['class'])} {inc[1]['position'][0]} {with_article(inc[0]['class'])}"
    if tag == "color_attr":
        a, b = inc
        return (
            f"{with_article(a['color'] + ' ' + a['class'])} and {with_article(b['color'] + ' ' + b['class'])}"
        )
    raise GrammarError(f"unknown tag {tag!r}")


def all_metadata(tag: str | None = None) -> list[Metadata]:
    """Every distinct prompt of the world (or of one tag), in a fixed order."""
    tags = CATEGORIES if tag is None else (tag,)
    out: list[Metadata] = []
    for t in tags:
        if t == "single_object":
            out += [make_metadata(t, shape=s) for s in SHAPES]
        elif t == "two_object":
            out += [make_metadata(t, shape_a=a, shape_b=b) for a, b in itertools.permutations(SHAPES, 2)]
        elif t == "counting":
            out += [make_metadata(t, shape=s, count=n) for s in SHAPES for n in (2, 3, 4)]
        elif t == "colors":
            out += [make_metadata(t, shape=s, color=c) for s in SHAPES for c in COLORS]
        elif t == "position":
            out += [
                make_metadata(t, shape_a=a, relation=r, shape_b=b)
                for a, b in itertools.permutations(SHAPES, 2)
                for r in RELATIONS
            ]
        elif t == "color_attr":
            out += [
                make_metadata(t, color_a=ca, shape_a=a, color_b=cb, shape_b=b)
                for a, b in itertools.permutations(SHAPES, 2)
                for ca, cb in itertools.permutations(COLORS, 2)
            ]
        else:
            raise GrammarError(f"unknown tag {t!r}; expected one of {', '.join(CATEGORIES)}")
    return out


_SHAPE = "|".join(SHAPES)
_COLOR = "|".join(COLORS)
_REL = "|".join(RELATIONS)
_PLURAL = "|".join(PLURALS.values())
_NUM = "|".join(NUMBER_WORDS[n] for n in (2, 3, 4))
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("single_object", re.compile(rf"an? (?P<shape>{_SHAPE})")),
    ("two_object", re.compile(rf"an? (?P<shape_a>{_SHAPE}) and an? (?P<shape_b>{_SHAPE})")),
    ("counting", re.compile(rf"(?P<num>{_NUM}) (?P<plural>{_PLURAL})")),
    ("colors", re.compile(rf"an? (?P<color>{_COLOR}) (?P<shape>{_SHAPE})")),
    ("position", re.compile(rf"an? (?P<shape_a>{_SHAPE}) (?P<relation>{_REL}) an? (?P<shape_b>{_SHAPE})")),
    (
        "color_attr",
        re.compile(
            rf"an? (?P<color_a>{_COLOR}) (?P<shape_a>{_SHAPE}) and "
            rf"an? (?P<color_b>{_COLOR}) (?P<shape_b>{_SHAPE})"
        ),
    ),
]
_WORD_TO_NUMBER = {w: n for n, w in NUMBER_WORDS.items()}
_SINGULAR = {p: s for s, p in PLURALS.items()}


def parse_prompt(prompt: str) -> Metadata:
    """Metadata of a prompt of the grammar (the inverse of `prompt_for`).

    Raises GrammarError naming the prompt when it is not a Shapes-world prompt.
    """
    text = " ".join(prompt.strip().lower().split())
    for tag, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groupdict()
        if tag == "counting":
            meta = make_metadata(tag, shape=_SINGULAR[g["plural"]], count=_WORD_TO_NUMBER[g["num"]])
        else:
            meta = make_metadata(tag, **g)
        if meta["prompt"] != text:
            break  # wrong article ("a orange"), fall through to the error
        return meta
    raise GrammarError(f"not a Shapes-world prompt: {prompt!r}")


def validate_metadata(meta: Any, where: str = "metadata") -> Metadata:
    """Check a metadata line against GenEval's schema and the world's vocabulary.

    Raises GrammarError with `where` (for example 'file.jsonl line 3') in the message.
    """

    def fail(msg: str) -> None:
        raise GrammarError(f"{where}: {msg}")

    if not isinstance(meta, dict):
        fail(f"expected a JSON object, got {type(meta).__name__}")
    if meta.get("tag") not in CATEGORIES:
        fail(f"'tag' must be one of {', '.join(CATEGORIES)}, got {meta.get('tag')!r}")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        fail("'include' must be a non-empty list of clauses")
    for key in ("include", "exclude"):
        clauses = meta.get(key, [])
        if not isinstance(clauses, list):
            fail(f"'{key}' must be a list")
        for i, clause in enumerate(clauses):
            if not isinstance(clause, dict):
                fail(f"{key}[{i}] must be an object")
            if clause.get("class") not in SHAPES:
                fail(f"{key}[{i}].class must be one of {', '.join(SHAPES)}, got {clause.get('class')!r}")
            count = clause.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                fail(f"{key}[{i}].count must be a positive integer, got {count!r}")
            # the world draws at most MAX_COUNT objects of a kind; an exclude clause caps a count at
            # one more than that (counting's "four" excludes five)
            most = MAX_COUNT if key == "include" else MAX_COUNT + 1
            if count > most:
                fail(f"{key}[{i}].count must be at most {most} (the Shapes world's range), got {count}")
            if "color" in clause and clause["color"] not in COLORS:
                fail(f"{key}[{i}].color must be one of {', '.join(COLORS)}, got {clause['color']!r}")
            if "position" in clause:
                pos = clause["position"]
                ok = (
                    isinstance(pos, (list, tuple))
                    and len(pos) == 2
                    and pos[0] in RELATIONS
                    and isinstance(pos[1], int)
                    and not isinstance(pos[1], bool)
                    and 0 <= pos[1] < i
                    and key == "include"
                )
                if not ok:
                    fail(
                        f"{key}[{i}].position must be [relation, index of an earlier include clause] "
                        f"with relation in {list(RELATIONS)}, got {pos!r}"
                    )
    if "prompt" in meta and not isinstance(meta["prompt"], str):
        fail("'prompt' must be a string")
    return meta


def normalize_metadata(meta: Metadata) -> Metadata:
    """A deep copy with positions as lists (JSON form), for comparisons and writing."""
    out = copy.deepcopy(meta)
    for clause in out.get("include", []):
        if "position" in clause:
            clause["position"] = list(clause["position"])
    return out


def read_metadata_jsonl(lines: Iterable[str], source: str = "<input>") -> list[Metadata]:
    """Parse GenEval metadata JSONL, validating every line (errors name source and line).

    Every line must also carry a non-empty "prompt" string: the text a model is given. A UTF-8 byte
    order mark before the first line is skipped; blank lines are skipped.
    """
    out = []
    for where, meta in json_lines(lines, source, GrammarError):
        if isinstance(meta, list):
            raise GrammarError(
                f"{where}: a JSON array; the file must be JSON lines, one metadata object per line"
            )
        validate_metadata(meta, where)
        prompt = meta.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise GrammarError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
        out.append(normalize_metadata(meta))
    return out
