"""A panel of simulated raters for the Shapes world: diverse, noisy, Bradley-Terry choosers.

Each rater scores an image x shown for a prompt c with a utility

    u_r(x, c) = w_f,r * faithfulness(x, c) + w_q,r * quality(x) + w_t,r * sum_k taste_g,k,r * feature_k(x)

and, shown two images A and B, chooses by the Bradley-Terry model (Bradley & Terry 1952)

    P(A > B) = sigmoid((u_r(A) - u_r(B)) / temperature),

except that |u_r(A) - u_r(B)| < tie_margin is a tie (label 0.5). The three parts, all read from the
image by the world's own detector (`detector.unmix`, its components and shape confidences, and the
GenEval `evaluate` verdict), so a model is judged only by what it drew:

* **faithfulness** in [0, 1]: the GenEval verdict with partial credit,
  ``(1 - correct_bonus) * held / n_clauses + correct_bonus * correct`` (defaults: correct_bonus 0.5, so
  a wrong image with half its clauses holding scores 0.25 and a correct one 1.0).
* **quality** in [0, 1]: a weighted mean (``PanelConfig.quality_parts``) of
  ``clean`` (1 - the share of ink outside every accepted object, see `QualityConfig`), ``sharp``
  (how binary the coverage of the accepted objects is: blur and faded colours lower it) and ``shape``
  (area-weighted shape confidence of every detected blob; shapeless blobs lower it).
* **taste** features in [0, 1], the same for everybody; groups weigh them differently
  (`TASTE_FEATURES`): ``size`` (objects' mean equal-area radius), ``warmth`` (area share of red,
  orange and yellow), ``centrality`` (how close the objects sit to the canvas centre).

Raters belong to groups (`RaterGroup`) whose taste weights differ in sign, so on pairs that differ in
taste the groups disagree systematically (diverse preferences, as in Pick-a-Pic); each rater jitters
its group's weights by a seeded log-normal factor. `RaterPanel.agreement` measures how often two raters
agree; the default temperature is calibrated so that it lies in the 65-80 % range of real preference
data (see docs/raters.md for the measurement on the shipped base model).

This module imports nothing from diffalign above `diffalign.world`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from diffalign.world.detector import DetectedObject, DetectorConfig, detect, load_image, unmix
from diffalign.world.geneval import Verdict, evaluate
from diffalign.world.grammar import Metadata, parse_prompt
from diffalign.world.palette import BACKGROUND_RGB, COLORS

#: Taste features, in the column order of `ImageFeatures.taste`.
TASTE_FEATURES: tuple[str, ...] = ("size", "warmth", "centrality")
#: Quality parts, in the column order of `ImageFeatures.quality_parts`.
QUALITY_PARTS: tuple[str, ...] = ("clean", "sharp", "shape")
#: Equal-area radius (fraction of the canvas side) mapped to size 0 and size 1.
SIZE_RANGE: tuple[float, float] = (0.07, 0.17)
WARM_COLORS: frozenset[str] = frozenset({"red", "orange", "yellow"})


@dataclass
class RaterGroup:
    """A group of raters sharing one taste.

    Attributes:
        name: the group's name (recorded with every choice its raters make).
        taste: weight per taste feature (keys from `TASTE_FEATURES`); positive likes more of it.
            Features not named weigh 0.
        share: the group's share of the panel's raters (shares are normalised over the groups).
    """

    name: str
    taste: dict[str, float]
    share: float = 1.0

    def __post_init__(self) -> None:
        unknown = set(self.taste) - set(TASTE_FEATURES)
        if unknown:
            raise ValueError(
                f"RaterGroup {self.name!r}: taste has unknown feature(s) {sorted(unknown)}; "
                f"expected a subset of {TASTE_FEATURES}"
            )
        if not (self.share >= 0 and math.isfinite(self.share)):
            raise ValueError(
                f"RaterGroup {self.name!r}: share must be a non-negative number, got {self.share}"
            )


def default_groups() -> list[RaterGroup]:
    """Two equal groups that both like centred layouts but disagree on size and colour: 'bold' likes
    large, warm objects, 'calm' small, cool ones."""
    return [
        RaterGroup("bold", {"size": 1.0, "warmth": 0.3, "centrality": 1.0}, share=0.5),
        RaterGroup("calm", {"size": -1.0, "warmth": -0.3, "centrality": 1.0}, share=0.5),
    ]


def default_quality_parts() -> dict[str, float]:
    return {"clean": 0.4, "sharp": 0.3, "shape": 0.3}


@dataclass
class QualityConfig:
    """How the quality parts are read from the detector's unmixing (all in [0, 1] after clamping).

    Attributes:
        ink_noise_floor: ink below this (a pixel's coverage, or for a pixel no palette blend explains
            its distance from white) is background noise and ignored.
        ink_scale: distance from white (RGB in [0, 1], Euclidean) that counts as full ink for a pixel
            no palette blend explains.
        ink_floor: the stray share is stray ink / max(total ink, ink_floor * H * W), so a few faint
            pixels on an almost empty canvas do not make it all stray.
        stray_tolerance: clean = 1 - stray share / stray_tolerance (0 when that much ink is stray).
        sharp_low, sharp_high: crispness (the mean of |2 coverage - 1| over the accepted objects'
            pixels) mapped linearly from [sharp_low, sharp_high] to [0, 1].
        shape_low, shape_high: area-weighted shape confidence mapped linearly from
            [shape_low, shape_high] to [0, 1].
        object_fringe: pixels around an object's core (by dilation) whose ink of its colour belongs to it.
    """

    ink_noise_floor: float = 0.1
    ink_scale: float = 1.0
    ink_floor: float = 0.02
    stray_tolerance: float = 0.5
    sharp_low: float = 0.4
    sharp_high: float = 0.8
    shape_low: float = 0.6
    shape_high: float = 0.95
    object_fringe: int = 1


@dataclass
class PanelConfig:
    """The panel: who rates, what they value and how noisy their choices are.

    Attributes:
        groups: the rater groups (at least one; see `default_groups`).
        n_raters: number of raters; each group gets round(share * n_raters) of them (largest remainder),
            at least one per group with a positive share.
        faithfulness_weight: w_f, weight of faithfulness in every rater's utility.
        quality_weight: w_q, weight of quality.
        taste_weight: w_t, weight of the group's taste term sum_k taste_k * feature_k.
        temperature: Bradley-Terry temperature: P(A > B) = sigmoid((u_A - u_B) / temperature); larger
            is noisier. Calibrated: 0.04 gives 72-74 % two-rater agreement on base-model pairs
            (docs/raters.md).
        tie_margin: a rater calls a tie when |u_A - u_B| < tie_margin (0 disables ties).
        rater_jitter: each rater multiplies each of its weights by exp(rater_jitter * z), z ~ N(0, 1)
            (seeded), so raters of a group differ a little.
        seed: seed of the raters' jitter.
        correct_bonus: share of faithfulness given for the whole verdict being correct; the rest is the
            fraction of clauses that hold.
        quality_parts: weight of each quality part ("clean", "sharp", "shape"); normalised.
        quality: thresholds of the quality parts.
        detector: the detector's thresholds.
    """

    groups: list[RaterGroup] = field(default_factory=default_groups)
    n_raters: int = 20
    faithfulness_weight: float = 1.0
    quality_weight: float = 0.5
    taste_weight: float = 0.5
    temperature: float = 0.04
    tie_margin: float = 0.01
    rater_jitter: float = 0.15
    seed: int = 0
    correct_bonus: float = 0.5
    quality_parts: dict[str, float] = field(default_factory=default_quality_parts)
    quality: QualityConfig = field(default_factory=QualityConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("PanelConfig.groups must hold at least one RaterGroup")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"PanelConfig.groups: group names must be unique, got {names}")
        if sum(g.share for g in self.groups) <= 0:
            raise ValueError("PanelConfig.groups: shares must have a positive sum")
        positive = sum(g.share > 0 for g in self.groups)
        if self.n_raters < positive:
            raise ValueError(
                f"PanelConfig.n_raters must be at least the number of groups with a share ({positive}), "
                f"got {self.n_raters}"
            )
        if not self.temperature > 0:
            raise ValueError(f"PanelConfig.temperature must be positive, got {self.temperature}")
        if self.tie_margin < 0:
            raise ValueError(f"PanelConfig.tie_margin must be >= 0, got {self.tie_margin}")
        if self.rater_jitter < 0:
            raise ValueError(f"PanelConfig.rater_jitter must be >= 0, got {self.rater_jitter}")
        if not 0.0 <= self.correct_bonus <= 1.0:
            raise ValueError(f"PanelConfig.correct_bonus must be in [0, 1], got {self.correct_bonus}")
        unknown = set(self.quality_parts) - set(QUALITY_PARTS)
        if (
            unknown
            or any(v < 0 for v in self.quality_parts.values())
            or sum(self.quality_parts.values()) <= 0
        ):
            raise ValueError(
                f"PanelConfig.quality_parts must give non-negative weights to {QUALITY_PARTS} with a "
                f"positive sum, got {self.quality_parts}"
            )


@dataclass
class Rater:
    """One simulated rater.

    Attributes:
        name: unique name ("<group>-<index>").
        group: its group's name.
        weights: [2 + len(TASTE_FEATURES)] float64 weights over `ImageFeatures.matrix()` columns:
            faithfulness, quality, then each taste feature (taste_weight already folded in).
    """

    name: str
    group: str
    weights: Tensor


@dataclass
class ImageFeatures:
    """What the panel sees in B images (computed once, reused by every rater).

    Attributes:
        prompts: the B prompts.
        faithfulness: [B] partial-credit faithfulness (see module doc).
        clause_fraction: [B] fraction of the verdict's clauses that hold.
        correct: [B] bool, GenEval's verdict.
        quality: [B] quality in [0, 1].
        quality_parts: [B, len(QUALITY_PARTS)] the parts, columns in `QUALITY_PARTS` order.
        taste: [B, len(TASTE_FEATURES)] taste features, columns in `TASTE_FEATURES` order.
        n_objects: [B] detected objects (with or without a shape).
    """

    prompts: list[str]
    faithfulness: Tensor
    clause_fraction: Tensor
    correct: Tensor
    quality: Tensor
    quality_parts: Tensor
    taste: Tensor
    n_objects: Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    def matrix(self) -> Tensor:
        """[B, 2 + K] float64: faithfulness, quality, taste features (the columns raters weigh)."""
        return torch.cat([self.faithfulness[:, None], self.quality[:, None], self.taste], dim=1)

    def select(self, index: Sequence[int] | Tensor) -> ImageFeatures:
        idx = torch.as_tensor(index, dtype=torch.long).flatten()
        return ImageFeatures(
            [self.prompts[i] for i in idx.tolist()],
            *(getattr(self, f.name)[idx] for f in fields(self) if f.name != "prompts"),
        )

    @staticmethod
    def concat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        if not parts:
            raise ValueError("ImageFeatures.concat needs at least one part")
        return ImageFeatures(
            [p for part in parts for p in part.prompts],
            *(torch.cat([getattr(part, f.name) for part in parts]) for f in fields(ImageFeatures)[1:]),
        )


@dataclass
class Labels:
    """Choices on N pairs.

    Attributes:
        prob_a: [N] float32 label: 1.0 A chosen, 0.0 B chosen, 0.5 a tie (Pick-a-Pic's label_0).
        raters: name of the rater who labelled each pair.
        groups: that rater's group.
        p_model: [N] the rater's Bradley-Terry P(A > B) (0.5 on ties) the label was drawn from.
        utility_a, utility_b: [N] the rater's utilities of A and B.
    """

    prob_a: Tensor
    raters: list[str]
    groups: list[str]
    p_model: Tensor
    utility_a: Tensor
    utility_b: Tensor

    def __len__(self) -> int:
        return int(self.prob_a.shape[0])

    @property
    def is_tie(self) -> Tensor:
        return self.prob_a == 0.5


@dataclass
class AgreementReport:
    """How much the panel agrees with itself on N pairs (expectations, no sampling).

    Attributes:
        n_pairs: pairs measured.
        two_rater: probability that two distinct raters drawn uniformly from the panel give the same
            label, given that neither calls a tie (pooled over pairs).
        oracle: the ceiling of any predictor that does not know the rater: the accuracy on non-tie labels
            of choosing, per pair, the side most raters prefer, mean of max(p, 1 - p) with p the pooled
            non-tie P(A > B).
        oracle_by_group: the same ceiling for a predictor told the rater's group.
        tie_rate: expected share of labels that are ties.
        within_group: two-rater agreement with both raters from the group.
        between_groups: "g1 vs g2" -> agreement of a rater of g1 with a rater of g2.
        per_group_disagreement: "g1 vs g2" -> share of pairs on which the two groups' pooled non-tie
            preferences point to different images (one above 0.5, the other below).
    """

    n_pairs: int
    two_rater: float
    oracle: float
    oracle_by_group: float
    tie_rate: float
    within_group: dict[str, float]
    between_groups: dict[str, float]
    per_group_disagreement: dict[str, float]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _ramp(x: float, low: float, high: float) -> float:
    return float(min(max((x - low) / (high - low), 0.0), 1.0))


def images_to_rgb(images: Tensor | np.ndarray | Sequence) -> list[np.ndarray]:
    """Images (uint8 or float [B, 3, H, W] tensor/array, or a sequence of images) -> float HWC arrays."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        array = images.detach().cpu()
        # integer levels go to load_image as they are (it checks their range); floats are clipped to [0, 1]
        array = array.double().clamp(0, 1).numpy() if array.is_floating_point() else array.numpy()
        return [load_image(a) for a in array]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [load_image(a) for a in images]
    return [load_image(a) for a in images]


def verdict_faithfulness(verdict: Verdict, correct_bonus: float = 0.5) -> tuple[float, float]:
    """(faithfulness, clause fraction) of a GenEval verdict (see module doc)."""
    n = len(verdict.clauses)
    fraction = sum(c.held for c in verdict.clauses) / n if n else float(verdict.correct)
    return (1.0 - correct_bonus) * fraction + correct_bonus * float(verdict.correct), fraction


def image_quality(
    rgb: np.ndarray,
    objects: list[DetectedObject],
    quality: QualityConfig | None = None,
    detector: DetectorConfig | None = None,
) -> dict[str, float]:
    """The quality parts of one float RGB image [H, W, 3] given its detections (see `QualityConfig`).

    Ink is the detector's coverage for pixels a palette blend explains and the distance from white
    (over `ink_scale`) for the rest, less `ink_noise_floor`. A detected object with a shape owns the
    ink of its colour in its connected core (the detector's component) dilated by `object_fringe`;
    everything else (stray pixels, components too small to be objects, shapeless blobs, off-palette
    smears, halos of blur) is stray. Returns {"clean", "sharp", "shape"} in [0, 1].
    """
    q = quality or QualityConfig()
    cfg = detector or DetectorConfig()
    h, w = rgb.shape[:2]
    label, cov = unmix(rgb, cfg)
    white = np.asarray(BACKGROUND_RGB, dtype=np.float64) / 255.0
    raw = np.where(label >= 0, cov, np.clip(np.linalg.norm(white - rgb, axis=-1) / q.ink_scale, 0.0, 1.0))
    ink = np.clip((raw - q.ink_noise_floor) / (1.0 - q.ink_noise_floor), 0.0, 1.0)

    # The detector's components: same thresholds, same 4-connectivity, matched to detections by box.
    structure = ndimage.generate_binary_structure(2, 1)
    owned = np.zeros((h, w), dtype=bool)
    crisp_num = crisp_den = 0.0
    shaped = {
        (o.color, round(o.box[0] * w), round(o.box[1] * h), round(o.box[2] * w), round(o.box[3] * h))
        for o in objects
        if o.shape is not None
    }
    for color_index, color in enumerate(COLORS):
        of_color = label == color_index
        core = of_color & (cov >= cfg.min_coverage)
        if not core.any():
            continue
        components, _ = ndimage.label(core, structure=structure)
        for comp_id, sl in enumerate(ndimage.find_objects(components), start=1):
            if sl is None or (color, sl[1].start, sl[0].start, sl[1].stop, sl[0].stop) not in shaped:
                continue
            mask = components == comp_id
            if q.object_fringe > 0:
                mask = ndimage.binary_dilation(mask, structure=structure, iterations=q.object_fringe)
            region = mask & of_color
            owned |= region
            c = cov[region]
            c = c[c > 0.02]
            crisp_num += float(np.abs(2 * c - 1).sum())
            crisp_den += len(c)
    total = float(ink.sum())
    stray = float(ink[~owned].sum())
    share = stray / max(total, q.ink_floor * h * w)
    clean = float(min(max(1.0 - share / q.stray_tolerance, 0.0), 1.0))
    sharp = _ramp(crisp_num / crisp_den, q.sharp_low, q.sharp_high) if crisp_den else 0.0
    area = sum(o.area for o in objects)
    conf = sum(o.area * o.confidence for o in objects) / area if area > 0 else 0.0
    shape = _ramp(conf, q.shape_low, q.shape_high) if objects else 0.0
    return {"clean": clean, "sharp": sharp, "shape": shape}


def taste_features(objects: list[DetectedObject]) -> dict[str, float]:
    """Taste features of one image's detections, each in [0, 1] (neutral 0.5 on an empty image).

    size: mean equal-area radius r = sqrt(area / pi) of the objects (fraction of the canvas side),
    mapped from SIZE_RANGE = [0.07, 0.17] to [0, 1]; warmth: area share of red, orange and yellow
    objects; centrality: 1 - (area-weighted mean distance of the objects' centroids from the canvas
    centre) / 0.5, clamped to [0, 1].
    """
    area = sum(o.area for o in objects)
    if not objects or area <= 0:
        return dict.fromkeys(TASTE_FEATURES, 0.5)
    radius = sum(math.sqrt(o.area / math.pi) for o in objects) / len(objects)
    warm = sum(o.area for o in objects if o.color in WARM_COLORS) / area
    dist = sum(o.area * math.hypot(o.x - 0.5, o.y - 0.5) for o in objects) / area
    return {
        "size": _ramp(radius, *SIZE_RANGE),
        "warmth": float(warm),
        "centrality": float(min(max(1.0 - dist / 0.5, 0.0), 1.0)),
    }


def _largest_remainder(shares: list[float], n: int) -> list[int]:
    total = sum(shares)
    exact = [s / total * n for s in shares]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(len(shares)), key=lambda i: -(exact[i] - counts[i]))[: n - sum(counts)]:
        counts[i] += 1
    for i, s in enumerate(shares):  # every group with a share gets a rater
        if s > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] = 1
    return counts


FeaturesOrImages = ImageFeatures | Tensor | np.ndarray


class RaterPanel:
    """Simulated raters choosing between images by Bradley-Terry on their utilities (module doc)."""

    def __init__(self, config: PanelConfig | None = None) -> None:
        self.config = config or PanelConfig()
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        counts = _largest_remainder([g.share for g in cfg.groups], cfg.n_raters)
        self.raters: list[Rater] = []
        for group, count in zip(cfg.groups, counts):
            base = torch.tensor(
                [cfg.faithfulness_weight, cfg.quality_weight]
                + [cfg.taste_weight * group.taste.get(k, 0.0) for k in TASTE_FEATURES],
                dtype=torch.float64,
            )
            for i in range(count):
                z = torch.randn(base.shape, generator=gen, dtype=torch.float64)
                self.raters.append(
                    Rater(f"{group.name}-{i:02d}", group.name, base * torch.exp(cfg.rater_jitter * z))
                )
        self.groups: list[str] = [g.name for g in cfg.groups if any(r.group == g.name for r in self.raters)]
        self.weights = torch.stack([r.weights for r in self.raters], dim=1)  # [D, R]
        self._rater_index = {r.name: i for i, r in enumerate(self.raters)}
        self._group_of = torch.tensor([self.groups.index(r.group) for r in self.raters])
        self._metadata: dict[str, Metadata] = {}

    # --- features -------------------------------------------------------------------------------

    def metadata(self, prompt: str) -> Metadata:
        """GenEval metadata of a Shapes-world prompt (cached; GrammarError names a bad prompt)."""
        if prompt not in self._metadata:
            self._metadata[prompt] = parse_prompt(prompt)
        return self._metadata[prompt]

    def features(self, images: Tensor | np.ndarray | Sequence, prompts: Sequence[str]) -> ImageFeatures:
        """Read faithfulness, quality and taste features of B images (uint8 [B, 3, H, W] or float in
        [0, 1]) shown for B prompts. About 10 ms per image on a CPU; compute once and reuse."""
        prompts = list(prompts)
        rgbs = images_to_rgb(images)
        if len(rgbs) != len(prompts):
            raise ValueError(f"features: {len(rgbs)} images but {len(prompts)} prompts")
        cfg = self.config
        faith, frac, correct, parts, taste, n_obj = [], [], [], [], [], []
        for rgb, prompt in zip(rgbs, prompts):
            meta = self.metadata(prompt)
            objects = detect(rgb, cfg.detector)
            verdict = evaluate(objects, meta)
            f, c = verdict_faithfulness(verdict, cfg.correct_bonus)
            faith.append(f)
            frac.append(c)
            correct.append(verdict.correct)
            q = image_quality(rgb, objects, cfg.quality, cfg.detector)
            parts.append([q[k] for k in QUALITY_PARTS])
            t = taste_features(objects)
            taste.append([t[k] for k in TASTE_FEATURES])
            n_obj.append(len(objects))
        qp = torch.tensor(parts, dtype=torch.float64).reshape(len(prompts), len(QUALITY_PARTS))
        qw = torch.tensor([cfg.quality_parts.get(k, 0.0) for k in QUALITY_PARTS], dtype=torch.float64)
        return ImageFeatures(
            prompts=prompts,
            faithfulness=torch.tensor(faith, dtype=torch.float64),
            clause_fraction=torch.tensor(frac, dtype=torch.float64),
            correct=torch.tensor(correct, dtype=torch.bool),
            quality=qp @ (qw / qw.sum()),
            quality_parts=qp,
            taste=torch.tensor(taste, dtype=torch.float64).reshape(len(prompts), len(TASTE_FEATURES)),
            n_objects=torch.tensor(n_obj, dtype=torch.long),
        )

    def _features(self, x: FeaturesOrImages, prompts: Sequence[str] | None, arg: str) -> ImageFeatures:
        if isinstance(x, ImageFeatures):
            if prompts is not None and list(prompts) != x.prompts:
                raise ValueError(f"{arg}: the ImageFeatures were computed for other prompts")
            return x
        if prompts is None:
            raise ValueError(f"{arg}: prompts are needed to read images")
        return self.features(x, prompts)

    # --- utilities and choices ------------------------------------------------------------------

    def rater_columns(self, rater: str | None = None, group: str | None = None) -> Tensor:
        """Indices of the raters selected: one rater by name, a group's raters, or all (both None)."""
        if rater is not None and group is not None:
            raise ValueError("give rater or group, not both")
        if rater is not None:
            if rater not in self._rater_index:
                raise ValueError(f"rater: no rater named {rater!r} in the panel")
            return torch.tensor([self._rater_index[rater]])
        if group is not None:
            if group not in self.groups:
                raise ValueError(f"group: no group named {group!r}; the panel has {self.groups}")
            return (self._group_of == self.groups.index(group)).nonzero().flatten()
        return torch.arange(len(self.raters))

    def rater_utilities(self, x: FeaturesOrImages, prompts: Sequence[str] | None = None) -> Tensor:
        """[B, R] float64 utility of each image for each rater."""
        return self._features(x, prompts, "images").matrix() @ self.weights

    def utility(
        self,
        x: FeaturesOrImages,
        prompts: Sequence[str] | None = None,
        group: str | None = None,
        rater: str | None = None,
    ) -> Tensor:
        """[B] utility: one rater's, or the mean over a group's raters, or over the whole panel
        (group None and rater None: the pooled utility)."""
        cols = self.rater_columns(rater, group)
        return self.rater_utilities(x, prompts)[:, cols].mean(dim=1)

    def _probabilities(self, ua: Tensor, ub: Tensor) -> tuple[Tensor, Tensor]:
        """Bradley-Terry P(A > B) per entry and a tie mask (|u_A - u_B| < tie_margin)."""
        delta = ua - ub
        tie = delta.abs() < self.config.tie_margin
        return torch.sigmoid(delta / self.config.temperature), tie

    def preference_prob(
        self,
        a: FeaturesOrImages,
        b: FeaturesOrImages,
        prompts: Sequence[str] | None = None,
        rater: str | None = None,
        group: str | None = None,
    ) -> Tensor:
        """[B] expected label E[prob_a] of a rater (or a random rater of a group, or of the panel):
        sigmoid((u_A - u_B) / temperature) by Bradley-Terry, 0.5 where the rater calls a tie."""
        cols = self.rater_columns(rater, group)
        fa = self._features(a, prompts, "a")
        fb = self._features(b, fa.prompts, "b")
        p, tie = self._probabilities(self.rater_utilities(fa)[:, cols], self.rater_utilities(fb)[:, cols])
        return torch.where(tie, torch.full_like(p, 0.5), p).mean(dim=1)

    def choose(
        self,
        a: FeaturesOrImages,
        b: FeaturesOrImages,
        rater_index: Tensor,
        uniforms: Tensor,
        prompts: Sequence[str] | None = None,
    ) -> Labels:
        """Deterministic choices: pair i is judged by rater `rater_index[i]`, who picks A when
        `uniforms[i]` < P(A > B) (Bradley-Terry) unless |u_A - u_B| < tie_margin (a tie)."""
        fa = self._features(a, prompts, "a")
        fb = self._features(b, fa.prompts, "b")
        n = len(fa)
        rater_index = torch.as_tensor(rater_index, dtype=torch.long).flatten()
        uniforms = torch.as_tensor(uniforms, dtype=torch.float64).flatten()
        if rater_index.shape[0] != n or uniforms.shape[0] != n:
            raise ValueError(
                f"choose: {n} pairs but {rater_index.shape[0]} raters and {uniforms.shape[0]} uniforms"
            )
        if len(fb) != n:
            raise ValueError(f"choose: {n} images A but {len(fb)} images B")
        rows = torch.arange(n)
        ua = self.rater_utilities(fa)[rows, rater_index]
        ub = self.rater_utilities(fb)[rows, rater_index]
        p, tie = self._probabilities(ua, ub)
        prob_a = torch.where(tie, 0.5, (uniforms < p).double())
        return Labels(
            prob_a=prob_a.float(),
            raters=[self.raters[i].name for i in rater_index.tolist()],
            groups=[self.raters[i].group for i in rater_index.tolist()],
            p_model=torch.where(tie, 0.5, p),
            utility_a=ua,
            utility_b=ub,
        )

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(rater_index [n], uniforms [n]) for `choose`: a rater drawn uniformly from the panel (so
        groups by their share) and a uniform number per pair. Pair i's draws do not depend on n (the
        first n of a longer draw are the draws for n), so a longer run extends a shorter one."""
        u = torch.rand((n, 2), generator=generator, dtype=torch.float64)
        rater_index = (u[:, 0] * len(self.raters)).long().clamp(max=len(self.raters) - 1)
        return rater_index, u[:, 1]

    def label(
        self,
        images_a: FeaturesOrImages,
        images_b: FeaturesOrImages,
        prompts: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> Labels:
        """Label N pairs, each by one rater drawn at random from the panel (seeded by `generator`)."""
        fa = self._features(images_a, prompts, "images_a")
        rater_index, uniforms = self.draw(len(fa), generator)
        return self.choose(fa, images_b, rater_index, uniforms, fa.prompts)

    # --- agreement ------------------------------------------------------------------------------

    def agreement(
        self, images_a: FeaturesOrImages, images_b: FeaturesOrImages, prompts: Sequence[str] | None = None
    ) -> AgreementReport:
        """Expected agreement between raters on N pairs (exact expectations under the model, no sampling;
        see `AgreementReport`)."""
        fa = self._features(images_a, prompts, "images_a")
        fb = self._features(images_b, fa.prompts, "images_b")
        if len(fb) != len(fa):
            raise ValueError(f"agreement: {len(fa)} images A but {len(fb)} images B")
        if len(fa) == 0:
            raise ValueError("agreement: needs at least one pair")
        p, tie = self._probabilities(self.rater_utilities(fa), self.rater_utilities(fb))  # [N, R]
        m = (~tie).double()
        within, between, opposed = {}, {}, {}
        group_p = []
        for gi, g in enumerate(self.groups):
            cols = self._group_of == gi
            within[g] = _pair_agreement(p[:, cols], m[:, cols], p[:, cols], m[:, cols], same=True)
            mass = m[:, cols].sum(1)
            group_p.append(torch.where(mass > 0, (m[:, cols] * p[:, cols]).sum(1) / mass.clamp(min=1), 0.5))
        for gi, g in enumerate(self.groups):
            for hj in range(gi + 1, len(self.groups)):
                h = self.groups[hj]
                ci, cj = self._group_of == gi, self._group_of == hj
                between[f"{g} vs {h}"] = _pair_agreement(p[:, ci], m[:, ci], p[:, cj], m[:, cj], same=False)
                opposed[f"{g} vs {h}"] = float(
                    ((group_p[gi] - 0.5) * (group_p[hj] - 0.5) < 0).double().mean()
                )
        mass = m.sum(1)
        pooled = (m * p).sum(1) / mass.clamp(min=1)
        oracle = float((mass * torch.maximum(pooled, 1 - pooled)).sum() / mass.sum().clamp(min=1))
        by_group = torch.zeros(())
        for gi in range(len(self.groups)):
            cols = self._group_of == gi
            gm = m[:, cols].sum(1)
            by_group = by_group + (gm * torch.maximum(group_p[gi], 1 - group_p[gi])).sum()
        return AgreementReport(
            n_pairs=len(fa),
            two_rater=_pair_agreement(p, m, p, m, same=True),
            oracle=oracle,
            oracle_by_group=float(by_group / mass.sum().clamp(min=1)),
            tie_rate=float(tie.double().mean()),
            within_group=within,
            between_groups=between,
            per_group_disagreement=opposed,
        )

    def calibrate_temperature(
        self,
        images_a: FeaturesOrImages,
        images_b: FeaturesOrImages,
        prompts: Sequence[str] | None = None,
        target: float = 0.72,
        bounds: tuple[float, float] = (1e-3, 10.0),
    ) -> float:
        """The temperature at which two-rater agreement on these pairs equals `target` (bisection on
        log temperature; agreement falls as the temperature rises). Sets it on this panel's config."""
        fa = self._features(images_a, prompts, "images_a")
        fb = self._features(images_b, fa.prompts, "images_b")
        lo, hi = math.log(bounds[0]), math.log(bounds[1])
        original = self.config.temperature
        reach = []
        for t in bounds:
            self.config.temperature = t
            reach.append(self.agreement(fa, fb).two_rater)
        if not reach[1] <= target <= reach[0]:
            self.config.temperature = original
            raise ValueError(
                f"target: agreement {target} is out of reach on these pairs: it ranges from {reach[1]:.3f} "
                f"(temperature {bounds[1]}) to {reach[0]:.3f} (temperature {bounds[0]})"
            )
        for _ in range(50):
            mid = (lo + hi) / 2
            self.config.temperature = math.exp(mid)
            if self.agreement(fa, fb).two_rater > target:
                lo = mid
            else:
                hi = mid
        self.config.temperature = math.exp((lo + hi) / 2)
        return self.config.temperature


def _pair_agreement(pa: Tensor, ma: Tensor, pb: Tensor, mb: Tensor, same: bool) -> float:
    """P(same label | both non-tie) for a rater drawn from set A and a distinct one from set B, pooled
    over pairs. p*: [N, R*] P(A > B) per rater, m*: [N, R*] 1 where the rater does not call a tie."""
    sa, sb = (ma * pa).sum(1), (mb * pb).sum(1)
    qa, qb = (ma * (1 - pa)).sum(1), (mb * (1 - pb)).sum(1)
    agree = sa * sb + qa * qb
    both = ma.sum(1) * mb.sum(1)
    if same:  # exclude a rater paired with itself
        agree = agree - (ma * (pa**2 + (1 - pa) ** 2)).sum(1)
        both = both - ma.sum(1)
    total = float(both.sum())
    return float(agree.sum()) / total if total > 0 else float("nan")
