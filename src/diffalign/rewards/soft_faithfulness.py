"""A differentiable relaxation of the Shapes world's grader ("shapes:faithfulness-soft").

The gold faithfulness reward (`rewards.gold.ShapesFaithfulness`) reads an image with the world's
detector (connected components, shape IoU), which has no gradient. This reward follows the same
GenEval clauses with every step replaced by a smooth one, so reward guidance, gradient DNO and reward
backpropagation can use a signal that agrees with the grader, as the black-box methods use the
grader's partial score:

1. **Soft unmixing** (the detector's step 1, relaxed): each pixel's blend weight a_c toward palette
   colour c is the projection of (white - pixel) on (white - colour c), clipped to [0, 1] in value
   but passing its gradient straight through (so a white pixel can still be pushed toward a colour);
   a softmax over the squared residuals of the colours' blends, of white, and of "unexplained" (the
   detector's test: residual above `max_residual` times the pixel's distance from white), with
   temperature `temperature`, gives the colour's share w_c, and the colour's ink is m_c = a_c w_c.
2. **Template IoU** (the detector's shape IoU, relaxed): each colour's ink is compared with a bank of
   shape templates drawn by the world's own renderer (circles, squares and equilateral triangles at
   several sizes and rotations; `template_bank`). Two convolutions give, at every pixel, the overlap
   |T m| of template T with the ink m and the ink inside the template's support (the shape grown by
   a ring), so the soft IoU |T m| / (|T| + |m| - |T m|) of a template centred there costs two
   convolutions per colour. A class's fit at a pixel is its best template's IoU.
3. **Objects.** An object of class s is detected at a pixel with probability
   p = sigmoid((IoU_s - threshold) / width) * sigmoid((IoU_s - IoU_other) / class_width), where
   IoU_other is the best other class's fit within `peak_radius` pixels (the detector gives a component
   one class: the best fitting). Candidates are the local maxima of p (found without gradient,
   greedy non-maximum suppression, like the detector's components); p's gradient flows into the
   pixels under the template.
4. **Clauses** (GenEval's rules, `world.geneval`): an include clause of count n scores the mean p of
   the n most probable objects of its class (of its colour, if it names one); a position clause
   scores the best product p_A p_B over the pairs of candidate objects whose centres satisfy GenEval's
   relation rule (centres and boxes from the peaks and their templates); an exclude clause of count n
   scores 1 - p of the n-th most probable object. The reward is the mean clause score, in [0, 1], like
   the grader's partial score.

What it leaves out: the detector's connected components (two touching objects of one colour are two
peaks here and one blob there), GenEval's rule that the n most confident objects of a class must all
have the clause's colour (an object of another colour is simply not counted), and box sizes from
the image (boxes are the matched template's). It is a surrogate: the benchmarks report gold
accuracy, never this score. Images of another size are area-resampled to the 32-pixel canvas first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.rewards.protocol import check_images, check_output
from diffalign.world.detector import DetectorConfig
from diffalign.world.geneval import POSITION_THRESHOLD
from diffalign.world.grammar import Metadata, parse_prompt
from diffalign.world.palette import BACKGROUND_RGB, DEFAULT_CANVAS_SIZE, PALETTE, SHAPES
from diffalign.world.render import coverage
from diffalign.world.scene import BOUNDING_RADIUS, SceneBatch


@dataclass
class SoftFaithfulnessConfig:
    """Settings of the relaxed grader (pixel sizes are on the 32-pixel canvas).

    Attributes:
        temperature: softmax temperature over squared unmixing residuals (smaller: harder colours).
        radii: equal-area radii (pixels) of the template bank; the world draws 2.9 to 5 pixels.
        ring: width (pixels) by which the ring template extends each shape's equal-area radius.
        square_rotations: square templates at this many rotations over 90 degrees.
        triangle_rotations: triangle templates at this many rotations over 120 degrees.
        phases: templates at this many sub-pixel offsets per axis (1: centred on pixels only).
        candidates: local maxima kept per detection map (objects considered per class and colour).
        peak_radius: local maxima closer than this many pixels (Chebyshev) are one object, and a
            class competes with the other classes' fits within this distance.
        threshold: template IoU at which an object is detected with probability 1/2.
        width: the soft detection's width (sigmoid scale) in IoU units.
        class_width: sigmoid scale of the class competition: the probability that the class is the
            best fit is sigmoid((IoU of the class - best IoU of another class) / class_width).
    """

    temperature: float = 0.01
    radii: tuple[float, ...] = (3.0, 3.75, 4.5)
    ring: float = 1.5
    square_rotations: int = 6
    triangle_rotations: int = 8
    phases: int = 1
    candidates: int = 6
    peak_radius: int = 2
    threshold: float = 0.5
    width: float = 0.05
    class_width: float = 0.02

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not self.radii or min(self.radii) <= 0:
            raise ValueError(f"radii must be positive pixel sizes, got {self.radii}")
        if self.ring <= 0 or self.width <= 0 or self.class_width <= 0:
            raise ValueError(
                "ring, width and class_width must be positive, got "
                f"{self.ring}, {self.width}, {self.class_width}"
            )
        if self.square_rotations < 1 or self.triangle_rotations < 1 or self.candidates < 1:
            raise ValueError("square_rotations, triangle_rotations and candidates must be at least 1")
        if self.peak_radius < 0:
            raise ValueError(f"peak_radius must be >= 0, got {self.peak_radius}")


@dataclass
class TemplateBank:
    """Shape templates: coverage kernels [T, 1, k, k], their supports (the shape grown by the ring)
    [T, 1, k, k], the class of each, and its box size (fraction of the canvas)."""

    kernels: Tensor
    supports: Tensor
    classes: Tensor
    box: Tensor


def template_bank(config: SoftFaithfulnessConfig, canvas: int = DEFAULT_CANVAS_SIZE) -> TemplateBank:
    """Draw the template bank with the world's renderer: each shape's coverage and its support (the
    shape with its equal-area radius grown by `config.ring` pixels)."""
    reach = max(config.radii) * BOUNDING_RADIUS["triangle"] + config.ring
    window = 2 * math.ceil(reach + 1) + 1
    square_turn, triangle_turn = (
        (math.pi / 2) / config.square_rotations,
        (2 * math.pi / 3) / config.triangle_rotations,
    )
    kinds = [(0, 0.0)]
    kinds += [(1, i * square_turn) for i in range(config.square_rotations)]
    kinds += [(2, i * triangle_turn) for i in range(config.triangle_rotations)]
    offsets = [j / config.phases / window for j in range(config.phases)]
    rows = [
        (shape_id, radius, turn, dx, dy)
        for dx in offsets
        for dy in offsets
        for radius in config.radii
        for shape_id, turn in kinds
    ]
    columns = [torch.tensor(column, dtype=torch.float32).view(-1, 1) for column in zip(*rows)]
    shape, sizes, rotations = columns[0].long(), columns[1], columns[2]
    centre_x, centre_y = 0.5 + columns[3], 0.5 + columns[4]

    def draw(extra: float) -> Tensor:
        batch = SceneBatch(
            shape, torch.zeros_like(shape), centre_x, centre_y, (sizes + extra) / window, rotations
        )
        return coverage(batch, window)[:, 0]

    inside = draw(0.0)
    support = torch.maximum(draw(config.ring), inside)
    bounding = torch.tensor([BOUNDING_RADIUS[name] for name in SHAPES])[shape.view(-1)]
    box = 2 * sizes.view(-1) * bounding / canvas
    return TemplateBank(inside.unsqueeze(1), support.unsqueeze(1), shape.view(-1), box)


def colour_ink(
    images: Tensor, temperature: float, max_residual: float = DetectorConfig.max_residual
) -> Tensor:
    """Soft per-colour ink [B, C, H, W] of images [B, 3, H, W] in [0, 1] (module doc, step 1)."""
    white = torch.tensor(BACKGROUND_RGB, dtype=images.dtype, device=images.device) / 255.0
    palette = torch.tensor(list(PALETTE.values()), dtype=images.dtype, device=images.device) / 255.0
    toward = white.view(1, 3, 1, 1) - images  # [B, 3, H, W]
    direction = white - palette  # [C, 3]
    blend = torch.einsum("bkhw,ck->bchw", toward, direction) / (direction**2).sum(1).view(1, -1, 1, 1)
    clipped = blend + (blend.clamp(0, 1) - blend).detach()  # value clipped, gradient straight through
    residual = ((toward.unsqueeze(1) - clipped.unsqueeze(2) * direction.view(1, -1, 3, 1, 1)) ** 2).sum(2)
    distance2 = (toward**2).sum(1, keepdim=True)
    unexplained = distance2 * max_residual**2  # the detector's residual test, relative to |white - pixel|
    share = torch.softmax(-torch.cat([residual, distance2, unexplained], 1) / temperature, dim=1)[:, :-2]
    return clipped * share


class SoftFaithfulness:
    """Differentiable surrogate of GenEval faithfulness on the Shapes world (module doc).

    Args:
        config: the relaxation's settings (default `SoftFaithfulnessConfig()`).
    """

    differentiable = True

    def __init__(self, config: SoftFaithfulnessConfig | None = None) -> None:
        self.config = config or SoftFaithfulnessConfig()
        self.name = "soft-faithfulness"
        self.bank = template_bank(self.config)
        # Built once: both kernel sets in one convolution, each template's area, each class's templates.
        self._kernels = torch.cat([self.bank.kernels, self.bank.supports])
        self._areas = self.bank.kernels.sum((1, 2, 3)).view(1, 1, -1, 1, 1)
        self._class_templates = [(self.bank.classes == s).nonzero().squeeze(1) for s in range(len(SHAPES))]
        self._metadata: dict[str, Metadata] = {}

    def detection_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Soft detection probability [B, C, S, H, W] of an object of each colour and shape centred at each
        pixel, and that pixel's best template's box size [B, C, S, H, W] (fraction of the canvas)."""
        if images.shape[-1] != DEFAULT_CANVAS_SIZE or images.shape[-2] != DEFAULT_CANVAS_SIZE:
            images = F.interpolate(images, size=(DEFAULT_CANVAS_SIZE, DEFAULT_CANVAS_SIZE), mode="area")
        ink = colour_ink(images, self.config.temperature)
        b, c, h, w = ink.shape
        kernels, area = self._kernels.to(ink), self._areas.to(ink)
        both = F.conv2d(ink.reshape(b * c, 1, h, w), kernels, padding=kernels.shape[-1] // 2)
        overlap, local_ink = both.view(b, c, 2, -1, h, w).unbind(2)
        # Soft intersection over union of the template with the ink inside the template's support:
        # |T m| / (|T| + |m| - |T m|), the detector's shape IoU with products for minima.
        response = overlap / (area + local_ink - overlap).clamp(min=1e-6)
        best, boxes = [], []
        for index in self._class_templates:
            index = index.to(ink.device)
            value, arg = response.index_select(2, index).max(2)
            best.append(value)
            boxes.append(self.bank.box.to(ink)[index][arg])
        best_t = torch.stack(best, 2)  # [B, C, S, H, W]
        # The other classes' best fit anywhere near the pixel (within peak_radius): like the detector,
        # which gives a component one class, a class counts only where it beats the others nearby.
        r = self.config.peak_radius
        near = [F.max_pool2d(v.reshape(-1, 1, h, w), 2 * r + 1, 1, r).view(b, c, h, w) for v in best]
        others = torch.stack(
            [torch.stack(near[:s] + near[s + 1 :]).max(0).values for s in range(len(SHAPES))], 2
        )
        cfg = self.config
        # An object: its best template fits (IoU above threshold) and beats every other class's.
        fits = torch.sigmoid((best_t - cfg.threshold) / cfg.width)
        prob = fits * torch.sigmoid((best_t - others) / cfg.class_width)
        return prob, torch.stack(boxes, 2)

    def _objects(self, maps: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Candidates of probability maps [..., H, W]: probabilities [..., K] (sorted), centres [..., K, 2],
        boxes [..., K]."""
        cfg = self.config
        *lead, h, w = maps.shape
        flat = maps.reshape(-1, 1, h, w)
        size = 2 * cfg.peak_radius + 1
        pooled = F.max_pool2d(flat.detach(), size, stride=1, padding=cfg.peak_radius)
        values = flat.detach()
        work = torch.where(values >= pooled, values, torch.full_like(values, -math.inf)).view(-1, h, w)
        # Greedy non-maximum suppression over the local maxima: a plateau (a symmetric object centred
        # between pixels) has several equal maxima, of which only the first is kept.
        rows = torch.arange(h, device=flat.device).view(1, h, 1)
        cols = torch.arange(w, device=flat.device).view(1, 1, w)
        picks, found = [], []
        for _ in range(min(cfg.candidates, h * w)):
            best, index = work.view(work.shape[0], -1).max(1)
            picks.append(index)
            found.append(torch.isfinite(best))
            near = ((rows - (index // w).view(-1, 1, 1)).abs() <= cfg.peak_radius) & (
                (cols - (index % w).view(-1, 1, 1)).abs() <= cfg.peak_radius
            )
            work = work.masked_fill(near, -math.inf)
        order, is_peak = torch.stack(picks, 1), torch.stack(found, 1)
        k = order.shape[1]
        prob = flat.view(flat.shape[0], -1).gather(1, order)
        prob = torch.where(is_peak, prob, prob * 0)
        scale = torch.tensor([w, h], device=flat.device)
        centres = torch.stack([(order % w).float() + 0.5, (order // w).float() + 0.5], -1) / scale
        box = boxes.reshape(flat.shape[0], -1).gather(1, order)
        return prob.view(*lead, k), centres.view(*lead, k, 2), box.view(*lead, k)

    def clause_scores(self, images: Tensor, prompts: Sequence[str]) -> list[Tensor]:
        """Each image's clause scores (a tensor of its clauses, in metadata order: includes then excludes)."""
        maps, boxes = self.detection_maps(images)
        # "Any colour" maps: an object has one colour, so a class's detection is its best colour's.
        any_value, any_arg = maps.max(1)
        any_box = boxes.gather(1, any_arg.unsqueeze(1)).squeeze(1)
        prob_c, centre_c, box_c = self._objects(maps, boxes)  # [B, C, S, K], ...
        prob_a, centre_a, box_a = self._objects(any_value, any_box)  # [B, S, K], ...
        colour_index = {name: i for i, name in enumerate(PALETTE)}
        out = []
        for i, prompt in enumerate(prompts):
            if prompt not in self._metadata:
                self._metadata[prompt] = parse_prompt(prompt)
            meta = self._metadata[prompt]
            candidates = []
            scores = []
            for clause in meta.get("include", []):
                s = SHAPES.index(clause["class"])
                if "color" in clause:
                    c = colour_index[clause["color"]]
                    cand = (prob_c[i, c, s], centre_c[i, c, s], box_c[i, c, s])
                else:
                    cand = (prob_a[i, s], centre_a[i, s], box_a[i, s])
                candidates.append(cand)
                if "position" in clause:
                    relation, target = clause["position"]
                    scores.append(_relation_score(cand, candidates[target], relation))
                else:
                    top = cand[0].sort(descending=True).values[: clause["count"]]
                    scores.append(top.mean())
            for clause in meta.get("exclude", []):
                s = SHAPES.index(clause["class"])
                ranked = prob_a[i, s].sort(descending=True).values
                n = clause["count"]
                scores.append(1 - ranked[n - 1] if n <= ranked.numel() else ranked.new_ones(()))
            out.append(torch.stack(scores))
        return out

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts, self.name)
        scores = torch.stack([s.mean() for s in self.clause_scores(images, prompts)])
        return check_output(scores, images.shape[0], self.name)


def _relation_score(subject: tuple, target: tuple, relation: str) -> Tensor:
    """Best p_A p_B over candidate pairs whose centres satisfy GenEval's relation rule (`geneval`)."""
    prob_a, centre_a, box_a = subject
    prob_b, centre_b, box_b = target
    offset = centre_a.unsqueeze(1) - centre_b.unsqueeze(0)  # [Ka, Kb, 2]
    margin = POSITION_THRESHOLD * (box_a.unsqueeze(1) + box_b.unsqueeze(0)).unsqueeze(-1)
    revised = (offset.abs() - margin).clamp(min=0) * offset.sign()
    norm = offset.norm(dim=-1).clamp(min=1e-6)
    dx, dy = revised[..., 0] / norm, revised[..., 1] / norm
    holds = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[relation]
    pair = prob_a.unsqueeze(1) * prob_b.unsqueeze(0)
    return torch.where(holds, pair, pair * 0).flatten().max()


__all__ = ["SoftFaithfulness", "SoftFaithfulnessConfig", "TemplateBank", "colour_ink", "template_bank"]
