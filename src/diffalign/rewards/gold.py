"""Gold rewards of the Shapes world: the truth a learned reward is measured against.

All are black boxes (`differentiable = False`): they read images with the world's detector.

* `ShapesFaithfulness` ("gold-faithfulness"): GenEval's verdict on the image for its prompt, 1.0 when
  every clause holds and 0.0 otherwise (exactly `world.geneval.score_image(...).correct`); with
  ``partial=True`` ("gold-faithfulness:partial") the fraction of clauses that hold.
* `ShapesQuality` ("gold-quality"): the raters' image quality in [0, 1] (stray ink, blur, shapeless
  blobs; see `world.raters.image_quality`).
* `GroupUtility` ("gold-utility" for the panel's pooled mean utility, "gold-utility:<group>" for one
  rater group's): the utility the simulated raters choose by (Bradley-Terry on its differences), so a
  reward model trained on simulated preferences is aiming at it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.rewards.protocol import Reward, check_images, check_output
from diffalign.world.detector import DetectorConfig, detect
from diffalign.world.geneval import Verdict, evaluate
from diffalign.world.grammar import Metadata, parse_prompt
from diffalign.world.raters import RaterPanel, images_to_rgb, verdict_faithfulness


class ShapesFaithfulness:
    """GenEval correctness of each image for its prompt (1.0 / 0.0), or the clause fraction.

    Args:
        partial: return the fraction of the verdict's clauses that hold instead of all-or-nothing.
        detector: the detector's thresholds (default `DetectorConfig()`).
    """

    differentiable = False

    def __init__(self, partial: bool = False, detector: DetectorConfig | None = None) -> None:
        self.partial = partial
        self.detector = detector or DetectorConfig()
        self.name = "gold-faithfulness:partial" if partial else "gold-faithfulness"
        self._metadata: dict[str, Metadata] = {}

    def verdicts(self, images: Tensor, prompts: Sequence[str]) -> list[Verdict]:
        """GenEval's verdict on each image (GrammarError names a prompt outside the world)."""
        check_images(images, prompts, self.name)
        out = []
        for rgb, prompt in zip(images_to_rgb(images), prompts):
            if prompt not in self._metadata:
                self._metadata[prompt] = parse_prompt(prompt)
            out.append(evaluate(detect(rgb, self.detector), self._metadata[prompt]))
        return out

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        values = [
            verdict_faithfulness(v)[1] if self.partial else float(v.correct)
            for v in self.verdicts(images, prompts)
        ]
        out = torch.tensor(values, dtype=torch.float32)
        return check_output(out, images.shape[0], self.name).to(images.device)


class ShapesQuality:
    """The rater panel's image quality in [0, 1] (needs no prompt semantics beyond a valid prompt)."""

    differentiable = False

    def __init__(self, panel: RaterPanel | None = None) -> None:
        self.panel = panel or RaterPanel()
        self.name = "gold-quality"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts, self.name)
        features = self.panel.features(images, prompts)
        return check_output(features.quality.float(), images.shape[0], self.name).to(images.device)


class GroupUtility:
    """A rater group's mean utility (or the whole panel's with group None) as a reward.

    Args:
        panel: the rater panel whose utility is the reward.
        group: a group name of the panel, or None for the pooled utility of all its raters.
    """

    differentiable = False

    def __init__(self, panel: RaterPanel | None = None, group: str | None = None) -> None:
        self.panel = panel or RaterPanel()
        if group is not None and group not in self.panel.groups:
            raise ValueError(f"group: no group named {group!r}; the panel has {self.panel.groups}")
        self.group = group
        self.name = "gold-utility" if group is None else f"gold-utility:{group}"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts, self.name)
        utility = self.panel.utility(self.panel.features(images, prompts), group=self.group)
        return check_output(utility.float(), images.shape[0], self.name).to(images.device)


def gold_rewards(panel: RaterPanel | None = None) -> dict[str, Reward]:
    """Every gold reward by name: faithfulness (binary and partial), quality, the pooled utility and
    one utility per rater group of `panel` (default `RaterPanel()`)."""
    panel = panel or RaterPanel()
    rewards: list[Reward] = [
        ShapesFaithfulness(),
        ShapesFaithfulness(partial=True),
        ShapesQuality(panel),
        GroupUtility(panel),
        *(GroupUtility(panel, g) for g in panel.groups),
    ]
    return {r.name: r for r in rewards}


__all__ = ["GroupUtility", "ShapesFaithfulness", "ShapesQuality", "gold_rewards"]
