"""Why images fail GenEval's rules: each failed clause named by what went wrong.

GenEval's verdict is binary per image; the accuracy says how often a task fails, not how. This module
reads the clause results of `diffalign.world.geneval.evaluate` (the per-image records of
`score_folder`) and names every failed clause by one mode:

| mode | the clause that failed |
|---|---|
| `missing` | an object the prompt asks for is not there at all |
| `too_few` | some, but fewer than the count asked |
| `too_many` | more than the count asked (GenEval's exclude clause of counting prompts) |
| `colour_leak` | the object is there in a colour the prompt gives to *another* object: attribute binding |
| `wrong_colour` | the object is there in a colour the prompt names for no object |
| `wrong_relation` | both objects are there, placed in another relation (e.g. right of, not left of) |
| `no_relation` | both objects are there, too close to be in any relation (overlapping or aligned) |
| `no_target` | the position's target failed its own clause (reported too): the relation is unchecked |

An image counts once for every mode among its failed clauses, so a category's mode shares can sum
to more than its failure rate. Works on any image GenEval's rules have judged, whoever drew it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

FAILURE_MODES = (
    "missing",
    "too_few",
    "too_many",
    "colour_leak",
    "wrong_colour",
    "wrong_relation",
    "no_relation",
    "no_target",
)


def clause_failure(clause_result: Mapping[str, Any], prompt_colours: Iterable[str]) -> str | None:
    """The failure mode of one clause result (`ClauseResult.__dict__`), or None when it held.

    Args:
        clause_result: a clause of a verdict: `kind`, `clause`, `held`, `found`, `colors`, `relations`.
        prompt_colours: the colours every include clause of the prompt names (to tell a colour taken
            from another object of the prompt from one the prompt never names).
    """
    if clause_result["held"]:
        return None
    clause = clause_result["clause"]
    if clause_result["kind"] == "exclude":
        return "too_many"
    count = int(clause["count"])
    found = int(clause_result["found"])
    if found < count:
        return "missing" if found == 0 else "too_few"
    colours = list(clause_result.get("colors") or [])
    if "color" in clause and colours.count(clause["color"]) < count:
        others = set(prompt_colours) - {clause["color"]}
        wrong = [c for c in colours if c != clause["color"]]
        return "colour_leak" if any(c in others for c in wrong) else "wrong_colour"
    if "position" in clause:
        relations = clause_result.get("relations") or []
        if not relations:
            return "no_target"
        if any(len(rel) == 0 for rel in relations):
            return "no_relation"
        return "wrong_relation"
    raise ValueError(f"clause {clause!r} failed for a reason no failure mode describes: {clause_result!r}")


def image_failures(record: Mapping[str, Any]) -> set[str]:
    """The failure modes of one judged image (a `score_folder` image record or `Verdict.to_dict()`)."""
    clauses = record["clauses"]
    colours = [c["clause"]["color"] for c in clauses if c["kind"] == "include" and "color" in c["clause"]]
    return {mode for c in clauses if (mode := clause_failure(c, colours)) is not None}


def failure_modes(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per category (`tag`): images, failed images, and the share of its images failing by each mode.

    Returns:
        {tag: {"images": n, "failed": k, "modes": {mode: share of the n images}}}, the modes in
        `FAILURE_MODES` order, those that never occur left out.
    """
    counts: dict[str, dict[str, Any]] = {}
    for record in records:
        entry = counts.setdefault(record["tag"], {"images": 0, "failed": 0, "modes": {}})
        entry["images"] += 1
        modes = image_failures(record)
        if not record["correct"] and not modes:
            raise ValueError(f"image {record.get('file', '?')} is judged wrong but no clause failed")
        entry["failed"] += int(not record["correct"])
        for mode in modes:
            entry["modes"][mode] = entry["modes"].get(mode, 0) + 1
    for entry in counts.values():
        seen = entry["modes"]
        entry["modes"] = {m: seen[m] / entry["images"] for m in FAILURE_MODES if m in seen}
    return counts


def format_modes(modes: Mapping[str, float], top: int = 3) -> str:
    """The `top` most frequent modes as 'mode share, ...' (for tables); '-' when there are none."""
    ranked = sorted(modes.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{mode} {share:.2f}" for mode, share in ranked) or "-"
