"""An independent drawing program for the detector tests: PIL's ImageDraw, its own layout and sizes.

It shares nothing with diffalign's renderer but the palette: shapes are drawn aliased (PIL draws no
anti-aliasing) at any canvas size, triangles as isosceles polygons with base = height pointing up or
down, squares axis-aligned, circles with `ellipse`. Objects go into distinct cells of a 3x3 grid with
jitter, so they never touch, and position prompts get cells in the required direction.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float, r: float, flip: bool
) -> None:
    fill = PALETTE[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.9
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        top, bottom = (cy + r, cy - r) if flip else (cy - r, cy + r)
        draw.polygon([(cx, top), (cx - r, bottom), (cx + r, bottom)], fill=fill)


def objects_for(meta: dict, rng: random.Random) -> list[tuple[str, str]]:
    """(shape, colour) of every object the prompt asks for; free colours drawn at random."""
    objects = []
    for clause in meta["include"]:
        for _ in range(clause["count"]):
            objects.append((clause["class"], clause.get("color", rng.choice(list(PALETTE)))))
    return objects


def cells_for(meta: dict, n: int, rng: random.Random) -> list[tuple[int, int]]:
    """Grid cells (col, row) for n objects; for a position prompt, object 1 relative to object 0."""
    if meta["tag"] == "position":
        relation = meta["include"][1]["position"][0]
        row, col = rng.randrange(3), rng.randrange(3)
        if relation in ("left of", "right of"):
            a, b = rng.sample(range(3), 2)
            a, b = (min(a, b), max(a, b)) if relation == "left of" else (max(a, b), min(a, b))
            return [(b, row), (a, row)]
        a, b = rng.sample(range(3), 2)
        a, b = (min(a, b), max(a, b)) if relation == "above" else (max(a, b), min(a, b))
        return [(col, b), (col, a)]
    cells = [(c, r) for c in range(3) for r in range(3)]
    return rng.sample(cells, n)


def draw_scene(
    objects: list[tuple[str, str]], cells: list[tuple[int, int]], size: int, rng: random.Random
) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for (shape, color), (col, row) in zip(objects, cells):
        r = cell * rng.uniform(0.28, 0.4)
        jitter = cell / 2 - r - cell * 0.04
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        draw_shape(draw, shape, color, cx, cy, r, flip=rng.random() < 0.5)
    return image


def draw_prompt(meta: dict, size: int, seed: int) -> Image.Image:
    """An image that satisfies the metadata, drawn by this module alone."""
    rng = random.Random(seed)
    objects = objects_for(meta, rng)
    return draw_scene(objects, cells_for(meta, len(objects), rng), size, rng)
