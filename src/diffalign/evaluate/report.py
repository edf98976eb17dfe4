"""Pieces of the HTML report: image grids and tables, written as one self-contained file."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image


def image_grid(
    images: np.ndarray | Sequence[np.ndarray], cols: int | None = None, scale: int = 4, pad: int = 2
) -> Image.Image:
    """uint8 images [N, H, W, 3] -> one PIL grid, each image enlarged `scale` times (nearest)."""
    images = [np.asarray(im) for im in images]
    if not images:
        raise ValueError("image_grid needs at least one image")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = images[0].shape[:2]
    cell_h, cell_w = h * scale + pad, w * scale + pad
    grid = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), (200, 200, 200))
    for k, image in enumerate(images):
        tile = Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        grid.paste(tile, (pad + (k % cols) * cell_w, pad + (k // cols) * cell_h))
    return grid


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figcaption { font-size: 0.9em; color: #555; max-width: 360px; }
img { image-rendering: pixelated; }
"""


def html_page(title: str, sections: Sequence[str]) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>"
    )
