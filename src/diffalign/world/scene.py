"""Scenes of the Shapes world and how they are laid out.

A scene is a few coloured shapes on a white canvas. Geometry is in normalised canvas units: (x, y)
is the shape's centroid with x to the right and y downwards in [0, 1], and `size` is the radius of
the circle of equal area (so a circle, a square and a triangle of the same size cover the same
number of pixels). Squares are axis-aligned and triangles equilateral and pointing up, unless a
`rotation` (radians, anticlockwise on screen) is given.

Layouts are sampled in batches on any torch device by vectorised rejection sampling: every scene of
the batch draws sizes and positions, the ones that violate a constraint (overlap, canvas edge, the
required relation) draw again. `SceneBatch` is the tensor form the renderer consumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.world.palette import COLORS, RELATIONS, SHAPES

#: Bounding radius (centroid to farthest point) of each shape, in units of its equal-area radius.
#: circle 1; square: half-side sqrt(pi)/2, corner at sqrt(2) times that; equilateral triangle:
#: circumradius R with (3 sqrt(3)/4) R^2 = pi s^2.
BOUNDING_RADIUS = {
    "circle": 1.0,
    "square": math.sqrt(math.pi) / 2 * math.sqrt(2),
    "triangle": math.sqrt(4 * math.pi / (3 * math.sqrt(3))),
}
#: Axis-aligned bounding-box width and height of each upright shape, in equal-area radii.
BOX_DIMS = {
    "circle": (2.0, 2.0),
    "square": (math.sqrt(math.pi), math.sqrt(math.pi)),
    "triangle": (BOUNDING_RADIUS["triangle"] * math.sqrt(3), BOUNDING_RADIUS["triangle"] * 1.5),
}


@dataclass(frozen=True)
class SceneObject:
    """One shape: its class, palette colour, centroid (x, y), equal-area radius and rotation."""

    shape: str
    color: str
    x: float
    y: float
    size: float
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {COLORS}")
        if not self.size > 0:
            raise ValueError(f"size must be positive, got {self.size}")


@dataclass(frozen=True)
class Scene:
    """A list of shapes drawn in order (later ones on top) on a white canvas."""

    objects: tuple[SceneObject, ...] = ()


SCENE_FIELDS = ("shape", "color", "x", "y", "size", "rotation")


@dataclass
class SceneBatch:
    """Scenes as tensors [B, K] with K object slots; empty slots have shape -1.

    Attributes:
        shape: shape index into `SHAPES`, -1 for an empty slot.
        color: colour index into `COLORS`.
        x, y: centroids in normalised canvas units (y downwards).
        size: equal-area radius in normalised canvas units.
        rotation: radians, anticlockwise on screen.
    """

    shape: Tensor
    color: Tensor
    x: Tensor
    y: Tensor
    size: Tensor
    rotation: Tensor

    def __len__(self) -> int:
        return int(self.shape.shape[0])

    @property
    def valid(self) -> Tensor:
        return self.shape >= 0

    def select(self, index: slice | Tensor | list[int]) -> SceneBatch:
        """The scenes at `index` (a slice or indices)."""
        return SceneBatch(*(getattr(self, f)[index] for f in SCENE_FIELDS))

    def to(self, device: torch.device | str) -> SceneBatch:
        return SceneBatch(*(getattr(self, f).to(device) for f in SCENE_FIELDS))

    def clone(self) -> SceneBatch:
        """A copy whose tensors can be edited without touching this batch."""
        return SceneBatch(*(getattr(self, f).clone() for f in SCENE_FIELDS))

    def put(self, index: Tensor, scenes: SceneBatch) -> None:
        """Overwrite the scenes at `index` [N] with `scenes` (N scenes with as many slots), in place."""
        for field in SCENE_FIELDS:
            getattr(self, field)[index] = getattr(scenes, field)

    @staticmethod
    def from_scenes(scenes: list[Scene], device: torch.device | str = "cpu") -> SceneBatch:
        slots = max([len(s.objects) for s in scenes] + [1])
        b = len(scenes)
        shape = torch.full((b, slots), -1, dtype=torch.long)
        color = torch.zeros((b, slots), dtype=torch.long)
        geo = torch.zeros((4, b, slots), dtype=torch.float32)
        for i, scene in enumerate(scenes):
            for k, obj in enumerate(scene.objects):
                shape[i, k] = SHAPES.index(obj.shape)
                color[i, k] = COLORS.index(obj.color)
                geo[:, i, k] = torch.tensor([obj.x, obj.y, obj.size, obj.rotation])
        return SceneBatch(shape, color, geo[0], geo[1], geo[2], geo[3]).to(device)

    def to_scenes(self) -> list[Scene]:
        cpu = self.to("cpu")
        scenes = []
        for i in range(len(cpu)):
            objs = tuple(
                SceneObject(
                    SHAPES[int(cpu.shape[i, k])],
                    COLORS[int(cpu.color[i, k])],
                    float(cpu.x[i, k]),
                    float(cpu.y[i, k]),
                    float(cpu.size[i, k]),
                    float(cpu.rotation[i, k]),
                )
                for k in range(cpu.shape.shape[1])
                if cpu.shape[i, k] >= 0
            )
            scenes.append(Scene(objs))
        return scenes


@dataclass
class LayoutConfig:
    """How scenes are laid out (all lengths in normalised canvas units).

    Attributes:
        size_range_few: equal-area radius range for scenes of one or two objects.
        size_range_many: the same for three or four objects (smaller, so they fit).
        gap: minimum distance between the bounding circles of two objects.
        margin: minimum distance between a bounding circle and the canvas edge.
        relation_margin: GenEval's box-size margin used when checking a required relation; larger
            than GenEval's 0.1 so that scenes satisfy it with room to spare.
        relation_min_cos: the required relation must hold with the margin-reduced offset at least
            this aligned with its axis (GenEval needs 0.5; higher means cleaner scenes).
        candidates: layouts drawn per scene and round of rejection sampling.
        shrink: after every 10 failed rounds, a scene's size range is multiplied by this.
        max_tries: rejection-sampling rounds before giving up with an error.
    """

    size_range_few: tuple[float, float] = (0.10, 0.155)
    size_range_many: tuple[float, float] = (0.09, 0.115)
    gap: float = 0.04
    margin: float = 0.03
    relation_margin: float = 0.15
    relation_min_cos: float = 0.7
    candidates: int = 16
    shrink: float = 0.95
    max_tries: int = 200


def _table(values: dict[str, object], device: torch.device) -> Tensor:
    return torch.tensor([values[s] for s in SHAPES], dtype=torch.float32, device=device)


def relation_holds(
    ax: Tensor,
    ay: Tensor,
    aw: Tensor,
    ah: Tensor,
    bx: Tensor,
    by: Tensor,
    bw: Tensor,
    bh: Tensor,
    relation: Tensor,
    margin: float,
    min_cos: float,
) -> Tensor:
    """GenEval's relative-position rule, vectorised: does A stand in `relation` (index) to B?

    offset = centre_A - centre_B, shrunk by margin * (dims_A + dims_B) per axis; the relation holds
    when the shrunk offset divided by the full offset's length passes `min_cos` along its axis.
    """
    dx, dy = ax - bx, ay - by
    rx = torch.clamp(dx.abs() - margin * (aw + bw), min=0) * torch.sign(dx)
    ry = torch.clamp(dy.abs() - margin * (ah + bh), min=0) * torch.sign(dy)
    norm = torch.sqrt(dx * dx + dy * dy).clamp_min(1e-9)
    ux, uy = rx / norm, ry / norm
    ok = torch.stack([ux < -min_cos, ux > min_cos, uy < -min_cos, uy > min_cos], dim=-1)
    return ok.gather(-1, relation.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def sample_layout(
    shape: Tensor,
    relation: Tensor,
    config: LayoutConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample (x, y, size) [B, K] for objects of the given shapes [B, K] (-1 = empty slot).

    `relation` [B] holds -1 (none) or an index into RELATIONS: object slot 1 must stand in that
    relation to slot 0 (GenEval's position clause). Objects never overlap and stay on the canvas.
    """
    device = shape.device
    b, k = shape.shape
    valid = shape >= 0
    n_obj = valid.sum(1)
    shape_c = shape.clamp_min(0)
    bound = _table(BOUNDING_RADIUS, device)[shape_c]
    box_w = _table({s: BOX_DIMS[s][0] for s in SHAPES}, device)[shape_c]
    box_h = _table({s: BOX_DIMS[s][1] for s in SHAPES}, device)[shape_c]
    lo = torch.where(n_obj <= 2, config.size_range_few[0], config.size_range_many[0]).float().unsqueeze(1)
    hi = torch.where(n_obj <= 2, config.size_range_few[1], config.size_range_many[1]).float().unsqueeze(1)

    x = torch.zeros((b, k), device=device)
    y = torch.zeros((b, k), device=device)
    size = torch.zeros((b, k), device=device)
    pending = torch.ones(b, dtype=torch.bool, device=device)
    pair_mask = valid.unsqueeze(2) & valid.unsqueeze(1) & ~torch.eye(k, dtype=torch.bool, device=device)
    m = config.candidates
    for round_ in range(config.max_tries):
        idx = pending.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        n = idx.numel()
        # m candidate layouts per pending scene, [n, m, k]; the first valid candidate is kept.
        u = torch.rand((3, n, m, k), generator=generator, device=generator.device if generator else device)
        u = u.to(device)
        # Scenes that keep failing (four large triangles, say) get gradually smaller objects.
        shrink = config.shrink ** (round_ // 10)
        lo_i, hi_i = lo[idx].unsqueeze(1) * shrink, hi[idx].unsqueeze(1) * shrink
        s = lo_i + u[0] * (hi_i - lo_i)
        r = s * bound[idx].unsqueeze(1)
        edge = config.margin + r
        cx = edge + u[1] * (1 - 2 * edge)
        cy = edge + u[2] * (1 - 2 * edge)
        dist = torch.sqrt((cx.unsqueeze(3) - cx.unsqueeze(2)) ** 2 + (cy.unsqueeze(3) - cy.unsqueeze(2)) ** 2)
        need = r.unsqueeze(3) + r.unsqueeze(2) + config.gap
        ok = ~((dist < need) & pair_mask[idx].unsqueeze(1)).any(dim=(2, 3))
        rel = relation[idx].unsqueeze(1).expand(n, m)
        has_rel = rel >= 0
        if has_rel.any():
            w, h = box_w[idx].unsqueeze(1) * s, box_h[idx].unsqueeze(1) * s
            holds = relation_holds(
                cx[..., 1],
                cy[..., 1],
                w[..., 1],
                h[..., 1],
                cx[..., 0],
                cy[..., 0],
                w[..., 0],
                h[..., 0],
                rel,
                config.relation_margin,
                config.relation_min_cos,
            )
            ok &= ~has_rel | holds
        found = ok.any(dim=1)
        first = ok.float().argmax(dim=1)
        rows = torch.arange(n, device=device)
        acc = idx[found]
        pick = first[found]
        x[acc] = cx[rows[found], pick]
        y[acc] = cy[rows[found], pick]
        size[acc] = s[rows[found], pick]
        pending[acc] = False
    if pending.any():
        raise RuntimeError(
            f"could not lay out {int(pending.sum())} scene(s) in {config.max_tries} rounds of "
            f"{config.candidates} candidates; reduce LayoutConfig sizes or gap"
        )
    zero = torch.zeros_like(x)
    return torch.where(valid, x, zero), torch.where(valid, y, zero), torch.where(valid, size, zero)


@dataclass
class SlotTemplate:
    """What a prompt asks of a scene, slot by slot (used to sample scenes for prompts).

    Attributes:
        shape: [P, K] shape index per slot, -1 empty.
        color: [P, K] colour index per slot, -1 = any colour (drawn uniformly).
        relation: [P] relation index of slot 1 to slot 0, -1 none.
    """

    shape: Tensor
    color: Tensor
    relation: Tensor


def templates_from_metadata(metas: list[dict], slots: int = 4) -> SlotTemplate:
    """Slot templates for metadata lines: exactly the objects the prompt names, nothing else."""
    p = len(metas)
    shape = torch.full((p, slots), -1, dtype=torch.long)
    color = torch.full((p, slots), -1, dtype=torch.long)
    relation = torch.full((p,), -1, dtype=torch.long)
    for i, meta in enumerate(metas):
        k = 0
        for clause in meta["include"]:
            for _ in range(clause["count"]):
                if k >= slots:
                    raise ValueError(f"prompt {meta.get('prompt')!r} needs more than {slots} objects")
                shape[i, k] = SHAPES.index(clause["class"])
                if "color" in clause:
                    color[i, k] = COLORS.index(clause["color"])
                k += 1
            if "position" in clause:
                relation[i] = RELATIONS.index(clause["position"][0])
    return SlotTemplate(shape, color, relation)


def sample_scenes(
    template: SlotTemplate,
    prompt_ids: Tensor,
    config: LayoutConfig | None = None,
    generator: torch.Generator | None = None,
) -> SceneBatch:
    """Scenes for the prompts `prompt_ids` [B] (indices into the template's rows)."""
    config = config or LayoutConfig()
    device = prompt_ids.device
    shape = template.shape.to(device)[prompt_ids]
    color = template.color.to(device)[prompt_ids]
    relation = template.relation.to(device)[prompt_ids]
    gen_device = generator.device if generator is not None else device
    random_color = torch.randint(len(COLORS), color.shape, generator=generator, device=gen_device).to(device)
    color = torch.where(color >= 0, color, random_color)
    x, y, size = sample_layout(shape, relation, config, generator)
    return SceneBatch(shape, color, x, y, size, torch.zeros_like(x))
