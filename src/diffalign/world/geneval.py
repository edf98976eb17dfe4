"""GenEval's verdict on one image, with the Shapes-world detector in place of Mask2Former + CLIP.

The rules are GenEval's `evaluate` (Ghosh et al. 2023, evaluation/evaluate_images.py):
- include clauses are ANDed: the `count` most confident objects of the class must exist; if the
  clause names a colour, that many of them must have it; if it names a position, every one of them
  must stand in the relation to every object matched by the clause it points at (which must itself
  have matched);
- exclude clauses: fewer than `count` objects of the class may be present (counting prompts exclude
  count + 1, so counts are exact);
- relations compare centres after shrinking the offset by 0.1 x (sum of the two boxes' sizes) per
  axis; "left of" needs the shrunk offset's x to be below -0.5 times the full offset's length. GenEval
  takes box centres; the world uses the coverage-weighted centroids (more stable for triangles).
An image is correct only if every clause holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffalign.world.detector import DetectedObject, DetectorConfig, detect

POSITION_THRESHOLD = 0.1


def relative_position(
    a: DetectedObject, b: DetectedObject, threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations of A to B ('left of', 'right of', 'above', 'below'), GenEval's rule on centroids."""
    dims_a = np.array([a.box[2] - a.box[0], a.box[3] - a.box[1]])
    dims_b = np.array([b.box[2] - b.box[0], b.box[3] - b.box[1]])
    offset = np.array([a.x - b.x, a.y - b.y])
    revised = np.maximum(np.abs(offset) - threshold * (dims_a + dims_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


@dataclass
class ClauseResult:
    """How one clause of the metadata fared.

    Attributes:
        kind: "include" or "exclude".
        clause: the clause as written in the metadata.
        held: whether it holds.
        found: objects of the clause's class detected (all of them, not only the top `count`).
        colors: colours of the top-`count` objects checked (include clauses with a colour).
        relations: relations found between each checked object and each target (position clauses).
        reason: GenEval-style explanation when it does not hold.
    """

    kind: str
    clause: dict
    held: bool
    found: int
    colors: list[str] = field(default_factory=list)
    relations: list[list[str]] = field(default_factory=list)
    reason: str = ""


@dataclass
class Verdict:
    """GenEval's verdict on an image: correct iff every clause holds."""

    correct: bool
    clauses: list[ClauseResult]
    objects: list[DetectedObject]

    @property
    def reason(self) -> str:
        return "\n".join(c.reason for c in self.clauses if c.reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "correct": self.correct,
            "reason": self.reason,
            "clauses": [c.__dict__ for c in self.clauses],
            "objects": [o.to_dict() for o in self.objects],
        }


def evaluate(objects: list[DetectedObject], metadata: dict) -> Verdict:
    """Apply GenEval's rules to detected objects (any order; sorted by confidence here)."""
    by_class: dict[str, list[DetectedObject]] = {}
    for obj in sorted(objects, key=lambda o: -o.confidence):
        if obj.shape is not None:
            by_class.setdefault(obj.shape, []).append(obj)
    results: list[ClauseResult] = []
    matched_groups: list[list[DetectedObject] | None] = []
    for clause in metadata.get("include", []):
        cls, count = clause["class"], clause["count"]
        everything = by_class.get(cls, [])
        found = everything[:count]
        result = ClauseResult("include", clause, True, len(everything))
        if len(found) < count:
            result.held = False
            result.reason = f"expected {cls}>={count}, found {len(found)}"
        else:
            if "color" in clause:
                result.colors = [o.color for o in found]
                n_right = result.colors.count(clause["color"])
                if n_right < count:
                    result.held = False
                    result.reason = (
                        f"expected {clause['color']} {cls}>={count}, found {n_right} {clause['color']}; and "
                        + ", ".join(f"{result.colors.count(c)} {c}" for c in dict.fromkeys(result.colors))
                    )
            if "position" in clause and result.held:
                relation, target = clause["position"]
                targets = matched_groups[target] if target < len(matched_groups) else None
                if targets is None:
                    result.held = False
                    result.reason = f"no target for {cls} to be {relation}"
                else:
                    for obj in found:
                        for target_obj in targets:
                            rels = relative_position(obj, target_obj)
                            result.relations.append(sorted(rels))
                            if relation not in rels:
                                result.held = False
                                result.reason = (
                                    f"expected {cls} {relation} target, found "
                                    f"{' and '.join(sorted(rels)) or 'no relation to'} target"
                                )
                                break
                        if not result.held:
                            break
        matched_groups.append(found if result.held else None)
        results.append(result)
    for clause in metadata.get("exclude", []):
        cls, count = clause["class"], clause["count"]
        n = len(by_class.get(cls, []))
        result = ClauseResult("exclude", clause, n < count, n)
        if not result.held:
            result.reason = f"expected {cls}<{count}, found {n}"
        results.append(result)
    return Verdict(all(r.held for r in results), results, objects)


def score_image(image: Any, metadata: dict, config: DetectorConfig | None = None) -> Verdict:
    """Detect the objects of `image` and judge it against `metadata`."""
    return evaluate(detect(image, config), metadata)
