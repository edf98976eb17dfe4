"""Deterministic, anti-aliased renderer of Shapes-world scenes (vectorised in torch).

Each shape is described by its exact signed distance function (SDF) in pixel units, evaluated at
pixel centres; the pixel's coverage is the SDF's linear box-filter estimate clamp(0.5 - sdf, 0, 1),
which anti-aliases edges to within a pixel. Shapes are composited in slot order over a white
background with their coverage as alpha. The same batch renders to the same pixels on a given
device every time; a batch of thousands of scenes renders in one pass on a CPU or a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from diffalign.world.palette import BACKGROUND_RGB, DEFAULT_CANVAS_SIZE, PALETTE
from diffalign.world.scene import BOUNDING_RADIUS, Scene, SceneBatch

_HALF_SIDE = math.sqrt(math.pi) / 2  # square half-side per unit equal-area radius
_CIRCUMRADIUS = BOUNDING_RADIUS["triangle"]  # triangle circumradius per unit equal-area radius


def _polygon_sdf(px: Tensor, py: Tensor, vx: Tensor, vy: Tensor) -> Tensor:
    """Exact signed distance from points to convex polygons (negative inside).

    px, py: [..., H, W] point coordinates broadcastable against the vertices' leading dims.
    vx, vy: [..., N] vertices in counter-clockwise order (in a y-up frame) of each polygon.
    """
    n = vx.shape[-1]
    best_dist2 = None
    inside = None
    for i in range(n):
        ax, ay = vx[..., i, None, None], vy[..., i, None, None]
        bx, by = vx[..., (i + 1) % n, None, None], vy[..., (i + 1) % n, None, None]
        ex, ey = bx - ax, by - ay
        wx, wy = px - ax, py - ay
        t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
        dx, dy = wx - ex * t, wy - ey * t
        dist2 = dx * dx + dy * dy
        # Left of every edge (cross product > 0 for counter-clockwise order) means inside.
        left = (ex * wy - ey * wx) >= 0
        best_dist2 = dist2 if best_dist2 is None else torch.minimum(best_dist2, dist2)
        inside = left if inside is None else inside & left
    dist = torch.sqrt(best_dist2)
    return torch.where(inside, -dist, dist)


def _shape_vertices(cx: Tensor, cy: Tensor, radius: Tensor, rotation: Tensor, n: int, start: float) -> tuple:
    """Vertices of a regular n-gon of circumradius `radius`, in a y-up frame, counter-clockwise."""
    angles = (
        start + rotation.unsqueeze(-1) + torch.arange(n, device=cx.device, dtype=cx.dtype) * (2 * math.pi / n)
    )
    vx = cx.unsqueeze(-1) + radius.unsqueeze(-1) * torch.cos(angles)
    vy = cy.unsqueeze(-1) + radius.unsqueeze(-1) * torch.sin(angles)
    return vx, vy


def _object_sdf(
    shape: int, px: Tensor, py: Tensor, cx: Tensor, cy: Tensor, size: Tensor, rot: Tensor
) -> Tensor:
    """SDF [N, h, w] of N objects of one shape, at points px [N, 1, w], py [N, h, 1] (pixel units)."""
    if shape == 0:
        return torch.sqrt((px - cx[:, None, None]) ** 2 + (py - cy[:, None, None]) ** 2) - size[:, None, None]
    if shape == 1:  # a regular 4-gon with circumradius half_side * sqrt(2), corners at 45 degrees
        vx, vy = _shape_vertices(cx, cy, size * _HALF_SIDE * math.sqrt(2), rot, 4, math.pi / 4)
    else:  # equilateral triangle, first vertex straight up, centroid at (cx, cy)
        vx, vy = _shape_vertices(cx, cy, size * _CIRCUMRADIUS, rot, 3, math.pi / 2)
    return _polygon_sdf(px, py, vx, vy)


def coverage(batch: SceneBatch, canvas_size: int = DEFAULT_CANVAS_SIZE) -> Tensor:
    """Per-object anti-aliased coverage [B, K, H, W] in [0, 1] (0 for empty slots).

    Each object's SDF is evaluated only on a square window around it (the window is the same for
    every object of the batch and holds the largest bounding circle), then scattered into the canvas.
    """
    if canvas_size < 1:
        raise ValueError(f"canvas size must be at least 1 pixel, got {canvas_size}")
    device = batch.x.device
    b, k = batch.shape.shape
    s = float(canvas_size)
    alpha = torch.zeros((b * k, canvas_size * canvas_size), device=device)
    flat_shape = batch.shape.reshape(-1)
    valid = (flat_shape >= 0).nonzero().squeeze(1)
    if valid.numel() == 0:
        return alpha.view(b, k, canvas_size, canvas_size)
    # Pixel units in a y-up frame: row r of the image has y = canvas_size - (r + 0.5).
    cx_all = batch.x.reshape(-1)[valid] * s
    cy_all = (1.0 - batch.y.reshape(-1)[valid]) * s
    size_all = batch.size.reshape(-1)[valid] * s
    rot_all = batch.rotation.reshape(-1)[valid]
    shape_all = flat_shape[valid]
    bound = torch.tensor([BOUNDING_RADIUS[n] for n in ("circle", "square", "triangle")], device=device)
    reach = float((size_all * bound[shape_all]).max())
    win = min(canvas_size, math.ceil(2 * reach + 3))
    col0 = (cx_all - win / 2).round().clamp(0, canvas_size - win).long()
    row0 = ((s - cy_all) - win / 2).round().clamp(0, canvas_size - win).long()
    offs = torch.arange(win, device=device)
    cols = col0[:, None] + offs  # [N, win]
    rows = row0[:, None] + offs
    px = (cols.float() + 0.5)[:, None, :]
    py = (s - (rows.float() + 0.5))[:, :, None]
    sdf = torch.empty((valid.numel(), win, win), device=device)
    for shape in range(3):
        sel = (shape_all == shape).nonzero().squeeze(1)
        if sel.numel():
            sdf[sel] = _object_sdf(
                shape, px[sel], py[sel], cx_all[sel], cy_all[sel], size_all[sel], rot_all[sel]
            )
    local = (0.5 - sdf).clamp(0.0, 1.0)
    index = (rows[:, :, None] * canvas_size + cols[:, None, :]).reshape(valid.numel(), -1)
    flat_index = (valid[:, None] * (canvas_size * canvas_size) + index).reshape(-1)
    alpha.view(-1)[flat_index] = local.reshape(-1)
    return alpha.view(b, k, canvas_size, canvas_size)


def render_batch(batch: SceneBatch, canvas_size: int = DEFAULT_CANVAS_SIZE) -> Tensor:
    """Render scenes to float images [B, 3, H, W] in [0, 1] on the batch's device."""
    device = batch.x.device
    alpha = coverage(batch, canvas_size)
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32, device=device) / 255.0
    colors = palette[batch.color.clamp(0, len(PALETTE) - 1)]  # [B, K, 3]
    background = torch.tensor(BACKGROUND_RGB, dtype=torch.float32, device=device) / 255.0
    image = background.view(1, 3, 1, 1).expand(len(batch), 3, canvas_size, canvas_size).clone()
    for k in range(batch.shape.shape[1]):
        a = alpha[:, k : k + 1]
        image = image * (1 - a) + colors[:, k, :, None, None] * a
    return image


def to_uint8(images: Tensor) -> np.ndarray:
    """Float images [B, 3, H, W] in [0, 1] -> uint8 arrays [B, H, W, 3] (rounded)."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def render_scene(scene: Scene, canvas_size: int = DEFAULT_CANVAS_SIZE) -> np.ndarray:
    """Render one scene to a uint8 RGB array [H, W, 3]."""
    return to_uint8(render_batch(SceneBatch.from_scenes([scene]), canvas_size))[0]
