"""PreferencePairs: pairwise comparisons held in memory as tensors, for reward-model and DPO training.

A comparison of K images with a chosen winner becomes K-1 pairs (winner, other); a tie between two images
becomes one pair with probability 0.5; skipped comparisons carry no preference and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class PreferencePairs:
    """N labelled pairs. `prob_a[i]` is the probability that image A of pair i is preferred:
    1.0 (A chosen), 0.0 (B chosen) or 0.5 (a tie), as in Pick-a-Pic's label_0."""

    prompts: list[str]
    images_a: Tensor  # uint8 [N, 3, H, W]
    images_b: Tensor  # uint8 [N, 3, H, W]
    prob_a: Tensor  # float32 [N]
    raters: list[str | None] = field(default_factory=list)  # rater name per pair (None if unknown)
    groups: list[str | None] = field(default_factory=list)  # rater group per pair (None if unknown)
    keys: list[str] = field(default_factory=list)  # the store's comparison key per pair ("" if none)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if not self.raters:
            self.raters = [None] * n
        if not self.groups:
            self.groups = [None] * n
        if not self.keys:
            self.keys = [""] * n
        for label, value in (
            ("images_a", self.images_a.shape[0]),
            ("images_b", self.images_b.shape[0]),
            ("prob_a", self.prob_a.shape[0]),
            ("raters", len(self.raters)),
            ("groups", len(self.groups)),
            ("keys", len(self.keys)),
        ):
            if value != n:
                raise ValueError(f"PreferencePairs: {n} prompts but {value} {label}")
        if self.images_a.shape != self.images_b.shape:
            raise ValueError(
                f"PreferencePairs: images_a {tuple(self.images_a.shape)} and images_b "
                f"{tuple(self.images_b.shape)} differ in shape"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def is_tie(self) -> Tensor:
        return self.prob_a == 0.5

    def select(self, index: Sequence[int] | Tensor) -> PreferencePairs:
        idx = torch.as_tensor(index, dtype=torch.long).flatten()
        pos = idx.tolist()
        return PreferencePairs(
            prompts=[self.prompts[i] for i in pos],
            images_a=self.images_a[idx],
            images_b=self.images_b[idx],
            prob_a=self.prob_a[idx],
            raters=[self.raters[i] for i in pos],
            groups=[self.groups[i] for i in pos],
            keys=[self.keys[i] for i in pos],
        )

    def without_ties(self) -> PreferencePairs:
        return self.select((~self.is_tie).nonzero().flatten())

    def split(self, held_out: float, seed: int = 0) -> tuple[PreferencePairs, PreferencePairs]:
        """A seeded random split into (train, held-out); `held_out` is the held-out fraction.

        The pairs of one comparison (the K-1 pairs of a ranking of K images share its key) go to the
        same side, so no held-out comparison is also trained on: comparisons are taken whole, in the
        seeded order of their first pair, until at least round(held_out x N) pairs (at least one) are
        held out, and never the last one (the training side keeps a comparison). With one pair per
        comparison (or no keys, "") this is a plain seeded split of the pairs.
        """
        if not 0.0 < held_out < 1.0:
            raise ValueError(f"held_out must be in (0, 1), got {held_out}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        n_held = max(1, round(held_out * len(self)))
        members: dict[object, list[int]] = {}
        for i in perm:  # a comparison's pairs, in the order of its first pair in the permutation
            members.setdefault(self.keys[i] or ("pair", i), []).append(i)
        groups = list(members.values())
        held: list[int] = []
        for group in groups[:-1]:
            if len(held) >= n_held:
                break
            held.extend(group)
        taken = set(held)
        return self.select([i for i in perm if i not in taken]), self.select(held)

    def swapped(self) -> PreferencePairs:
        """The same pairs with A and B exchanged (prob_a becomes 1 - prob_a)."""
        return PreferencePairs(
            list(self.prompts),
            self.images_b,
            self.images_a,
            1.0 - self.prob_a,
            list(self.raters),
            list(self.groups),
            list(self.keys),
        )

    @staticmethod
    def concat(parts: Sequence[PreferencePairs]) -> PreferencePairs:
        if not parts:
            raise ValueError("PreferencePairs.concat needs at least one part")
        return PreferencePairs(
            prompts=[p for part in parts for p in part.prompts],
            images_a=torch.cat([part.images_a for part in parts]),
            images_b=torch.cat([part.images_b for part in parts]),
            prob_a=torch.cat([part.prob_a for part in parts]),
            raters=[r for part in parts for r in part.raters],
            groups=[g for part in parts for g in part.groups],
            keys=[k for part in parts for k in part.keys],
        )
