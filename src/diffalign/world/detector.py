"""Read an image of the Shapes world back into objects: colour, shape, centroid, box.

The detector knows the palette and the three shape classes, nothing about how an image was drawn,
so it reads images from this package's renderer, from other programs (PIL, matplotlib, ...) and
from generative models alike. It works in four steps:

1. **Unmixing.** Every pixel is explained as a blend a * colour + (1 - a) * white of one palette
   colour: for each colour the blend weight a is the least-squares projection of (white - pixel)
   on (white - colour), and the colour whose blend leaves the smallest residual wins. The result is
   a colour label and a coverage a in [0, 1] per pixel; anti-aliased edges get fractional coverage
   of the right colour instead of a wrong palette entry. Pixels that no blend explains (grey, black,
   strong noise) are background.
2. **Components.** Pixels of one colour with coverage >= 0.5 form 4-connected components; small
   components (stray pixels) are dropped.
3. **Shape.** Each component's coverage map (with its anti-aliased fringe) is compared to ideal
   shapes of the same area and centroid: a circle, squares at 12 rotations and triangles
   (equilateral, isosceles with base = height, right isosceles) at rotations covering every
   orientation. The class of the best soft intersection-over-union wins, and that IoU is the
   detection's confidence; a component that matches no shape well (a shapeless blob, two objects
   merged) is reported with shape None and is not counted as any class.
4. **Geometry.** Centroid and bounding box from the coverage-weighted pixels, in pixels and
   normalised to [0, 1].

Known limits: two touching objects of the same colour merge into one component (the scene sampler
never draws them, generated images may); shapes smaller than about 2.5 pixels in radius are not
reliably classified.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from diffalign.images import displayed_rgb
from diffalign.world.palette import BACKGROUND_RGB, COLORS, SHAPES, palette_array


@dataclass
class DetectorConfig:
    """Thresholds of the detector (areas are fractions of the image area, so any size works).

    Attributes:
        min_coverage: a pixel belongs to an object when its coverage is at least this.
        max_residual: a pixel whose best blend leaves a residual above this fraction of its
            distance from white is unexplained (background).
        min_area: components smaller than this fraction of the image are stray pixels.
        min_area_pixels: and smaller than this many pixels, whatever the image size.
        min_confidence: a component whose best shape IoU is below this has no shape.
        fringe: pixels around a component (by dilation) whose partial coverage counts for its shape.
    """

    min_coverage: float = 0.5
    max_residual: float = 0.35
    min_area: float = 0.006
    min_area_pixels: int = 5
    min_confidence: float = 0.7
    fringe: int = 1


@dataclass
class DetectedObject:
    """One object read from an image.

    Attributes:
        shape: "circle", "square", "triangle", or None for an unrecognisable blob.
        color: palette colour name.
        confidence: soft IoU with the best-matching ideal shape (used to order detections, like a
            detector's score in GenEval).
        x, y: coverage-weighted centroid, normalised to [0, 1] (y downwards).
        box: (x0, y0, x1, y1) normalised bounding box of the pixels with enough coverage.
        area: covered area as a fraction of the image.
        scores: IoU per shape class.
    """

    shape: str | None
    color: str
    confidence: float
    x: float
    y: float
    box: tuple[float, float, float, float]
    area: float
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def load_image(source: str | Path | Image.Image | np.ndarray, size: int | None = None) -> np.ndarray:
    """Any image (path, PIL image, 8-bit integer or float array HWC or CHW, tensor) -> float RGB [H,W,3].

    Shown as a viewer shows it (`diffalign.images.displayed_rgb`: EXIF orientation, 16-bit grey
    scaled, transparency composited over white). With `size`, the image is resized to size x size with a
    box filter (area averaging, which keeps colours and anti-aliases edges). Raises ValueError naming
    the file when it cannot be read.
    """
    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as im:
                im.load()
                image = displayed_rgb(im)
        except Exception as err:  # PIL raises many types for bad files
            raise ValueError(f"cannot read image {source}: {err}") from None
        source = image
    if isinstance(source, Image.Image):
        pil = displayed_rgb(source)  # EXIF orientation, 16-bit grey, transparency over the white background
        if size is not None and pil.size != (size, size):
            pil = pil.resize((size, size), Image.Resampling.BOX)
        return np.asarray(pil, dtype=np.float64) / 255.0
    array = source.detach().cpu().numpy() if hasattr(source, "detach") else np.asarray(source)
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"expected an RGB image, got an empty array of shape {array.shape}")
    array = _unit_range(array)
    if array.shape[-1] == 4:
        a = array[..., 3:4]
        array = array[..., :3] * a + (1 - a) * (np.asarray(BACKGROUND_RGB) / 255.0)
    array = np.clip(array, 0.0, 1.0)
    if size is not None and array.shape[:2] != (size, size):
        return load_image(Image.fromarray((array * 255).round().astype(np.uint8)), size)
    return array


def _unit_range(array: np.ndarray) -> np.ndarray:
    """Pixel values as float64 in [0, 1]: integer images are 8-bit levels (uint16: 16-bit levels), float
    images are in [0, 1] (values a little outside, as a model draws them, are clipped by the caller)."""
    if array.dtype == np.uint16:
        return array.astype(np.float64) / 65535.0
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"an integer image holds 8-bit levels 0-255, got values from {array.min()} to {array.max()}"
            )
        return array.astype(np.float64) / 255.0
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("the image holds NaN or infinite values")
    return array


def unmix(image: np.ndarray, config: DetectorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel palette label [H,W] (-1 background) and coverage [H,W] (see module doc, step 1)."""
    white = np.asarray(BACKGROUND_RGB, dtype=np.float64) / 255.0
    d = white - image  # [H, W, 3]
    e = white - palette_array()  # [C, 3]
    a = np.einsum("hwk,ck->hwc", d, e) / np.einsum("ck,ck->c", e, e)  # blend weight per colour
    a = np.clip(a, 0.0, None)
    resid = ((d[:, :, None, :] - a[..., None] * e[None, None]) ** 2).sum(-1)
    best = resid.argmin(-1)
    cov = np.take_along_axis(a, best[..., None], -1)[..., 0]
    best_resid = np.take_along_axis(resid, best[..., None], -1)[..., 0]
    dist2 = (d**2).sum(-1)
    explained = best_resid <= (config.max_residual**2) * np.maximum(dist2, 1e-12)
    label = np.where(explained & (cov > 0), best, -1)
    return label, np.where(label >= 0, np.clip(cov, 0.0, 1.0), 0.0)


# --- ideal shapes -------------------------------------------------------------------------------


def _regular_polygon(n: int, start: float) -> np.ndarray:
    angles = start + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(angles), np.sin(angles)], -1)


def _normalise(vertices: np.ndarray) -> np.ndarray:
    """Translate the polygon's centroid to 0 and scale it to unit area."""
    x, y = vertices[:, 0], vertices[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    cx = ((x + x1) * cross).sum() / (6 * area)
    cy = ((y + y1) * cross).sum() / (6 * area)
    out = (vertices - [cx, cy]) / math.sqrt(abs(area))
    return out if area > 0 else out[::-1]


def _rotate(vertices: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return vertices @ np.array([[c, s], [-s, c]])


#: Square templates every 7.5 degrees over a square's 90-degree period (12 rotations, as the module doc says).
SQUARE_ANGLES: tuple[float, ...] = tuple(7.5 * i for i in range(12))


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    """Unit-area ideal polygons per class, stacked [T, n_vertices, 2] (the circle is analytic)."""
    square = _normalise(_regular_polygon(4, np.pi / 4))
    squares = [_rotate(square, math.radians(a)) for a in SQUARE_ANGLES]
    triangle_bases = [
        (_normalise(_regular_polygon(3, np.pi / 2)), 120),  # equilateral
        (_normalise(np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, 1.0]])), 360),  # isosceles, base = height
        (_normalise(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])), 360),  # right isosceles
    ]
    triangles = [
        _rotate(base, math.radians(a)) for base, period in triangle_bases for a in np.arange(0, period, 10)
    ]
    return {"square": np.stack(squares), "triangle": np.stack(triangles)}


def _polygons_coverage(polys: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage [T, h, w] of convex polygons [T, n, 2] (counter-clockwise) at points."""
    x = px[None]
    y = py[None]
    best = np.full((len(polys), *px.shape), np.inf)
    inside = np.ones_like(best, dtype=bool)
    n = polys.shape[1]
    for j in range(n):
        ax, ay = polys[:, j, 0, None, None], polys[:, j, 1, None, None]
        ex = polys[:, (j + 1) % n, 0, None, None] - ax
        ey = polys[:, (j + 1) % n, 1, None, None] - ay
        wx, wy = x - ax, y - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0, 1)
        best = np.minimum(best, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        inside &= (ex * wy - ey * wx) >= 0
    dist = np.sqrt(best)
    return np.clip(0.5 + np.where(inside, dist, -dist), 0.0, 1.0)


def _centroid(cov: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[float, float]:
    """Coverage-weighted centroid (row, column) of a patch whose pixels sit at rows x cols."""
    total = cov.sum()
    return float(cov.sum(axis=1) @ (rows + 0.5) / total), float(cov.sum(axis=0) @ (cols + 0.5) / total)


def classify(
    cov: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    visible: np.ndarray | None = None,
    outward: tuple[float, float] = (0.0, 0.0),
    blurs: tuple[float, ...] = (0.6, 1.0),
) -> dict[str, float]:
    """Soft IoU of a coverage patch with the best ideal shape of each class (see module doc).

    `rows`/`cols` are the patch's pixel coordinates; `visible` marks the pixels inside the image.
    For an object cut by the image border, `outward` (a unit vector in image coordinates) points
    out of the image: the hidden part makes the visible centroid and area too small, so the ideal
    shapes are also tried moved outwards and enlarged, and compared on the visible pixels only.
    """
    visible = np.ones_like(cov, dtype=bool) if visible is None else visible
    total = cov.sum()
    if total <= 0:
        return dict.fromkeys(SHAPES, 0.0)
    rr, cc = np.meshgrid(rows + 0.5, cols + 0.5, indexing="ij")
    cy, cx = _centroid(cov, rows, cols)
    cut = outward != (0.0, 0.0)
    shifts = (0.0, 0.75, 1.5, 2.5) if cut else (0.0,)
    growth = (1.0, 1.15, 1.3, 1.5) if cut else (1.0,)
    polys = _templates()
    scores = dict.fromkeys(SHAPES, 0.0)
    for shift in shifts:
        # y-up frame, centred on the (possibly moved) centroid.
        px = cc - (cx + shift * outward[0])
        py = (cy + shift * outward[1]) - rr
        for grow in growth:
            scale = math.sqrt(total * grow)
            circle = np.clip(0.5 - (np.sqrt(px**2 + py**2) - scale / math.sqrt(math.pi)), 0.0, 1.0)[None]
            ideals = {
                "circle": circle,
                "square": _polygons_coverage(polys["square"] * scale, px, py),
                "triangle": _polygons_coverage(polys["triangle"] * scale, px, py),
            }
            for name, ideal in ideals.items():
                # Sharp templates and the same slightly blurred (generated or resized images are
                # rarely sharp; blur rounds a small square's corners towards a circle).
                variants = [ideal] + [
                    ndimage.gaussian_filter(ideal, sigma=(0, b, b), mode="constant") for b in blurs
                ]
                for cand in variants:
                    cand = np.where(visible, cand, 0.0)
                    inter = np.minimum(cand, cov).sum(axis=(-2, -1))
                    union = np.maximum(cand, cov).sum(axis=(-2, -1))
                    scores[name] = max(scores[name], float((inter / np.maximum(union, 1e-12)).max()))
    return scores


#: A component wider or taller than this many pixels is classified on a block-averaged copy of its
#: patch at most this size (shape IoU does not depend on scale; the world's 32-pixel images never reach
#: it). Without it, a large object cut by the border of a 512-pixel image took minutes.
MAX_PATCH = 32


def _blocks(array: np.ndarray, factor: int, anchors: tuple[int, int], reduce: str = "mean") -> np.ndarray:
    """`array` [h, w] averaged (or, with reduce="all", and-ed) over factor x factor blocks whose edges
    fall on row anchors[0] and column anchors[1]; the array is padded with zeros (False: True) to fit."""
    fill = reduce == "all"
    pads = []
    for axis, anchor in enumerate(anchors):
        before = (-anchor) % factor
        after = (-(array.shape[axis] + before)) % factor
        pads.append((before, after))
    padded = np.pad(array, pads, constant_values=fill)
    h, w = padded.shape[0] // factor, padded.shape[1] // factor
    tiles = padded.reshape(h, factor, w, factor)
    return tiles.all(axis=(1, 3)) if fill else tiles.mean(axis=(1, 3))


def detect(
    image: np.ndarray | Image.Image | str | Path, config: DetectorConfig | None = None
) -> list[DetectedObject]:
    """Detect the objects of an image, most confident first (see the module doc)."""
    config = config or DetectorConfig()
    rgb = image if isinstance(image, np.ndarray) and image.dtype == np.float64 else load_image(image)
    h, w = rgb.shape[:2]
    label, cov = unmix(rgb, config)
    min_pixels = max(config.min_area_pixels, config.min_area * h * w)
    objects: list[DetectedObject] = []
    structure = ndimage.generate_binary_structure(2, 1)
    for color_index, color in enumerate(COLORS):
        of_color = label == color_index
        core = of_color & (cov >= config.min_coverage)
        if not core.any():
            continue
        components, _n = ndimage.label(core, structure=structure)
        slices = ndimage.find_objects(components)
        for comp_id, sl in enumerate(slices, start=1):
            if sl is None:
                continue
            mask_core = components[sl] == comp_id
            n_pixels = int(mask_core.sum())
            if n_pixels < min_pixels:
                continue
            pad = config.fringe + 1
            r0, r1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
            c0, c1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
            own = components[r0:r1, c0:c1] == comp_id
            region = ndimage.binary_dilation(own, structure=structure, iterations=config.fringe)
            # The fringe: partial coverage of this colour that belongs to no other component.
            region &= of_color[r0:r1, c0:c1] & ((components[r0:r1, c0:c1] == 0) | own)
            patch = np.where(region, cov[r0:r1, c0:c1], 0.0)
            rows, cols = np.arange(r0, r1), np.arange(c0, c1)
            total = patch.sum()
            cy, cx = _centroid(patch, rows, cols)
            # An object cut by the image border: extend the patch outside the image (invisible).
            ox = float(sl[1].stop >= w) - float(sl[1].start <= 0)
            oy = float(sl[0].stop >= h) - float(sl[0].start <= 0)
            ext = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
            factor = math.ceil(ext / MAX_PATCH)
            if ox or oy:
                er0, er1 = r0 - (ext if oy < 0 else 0), r1 + (ext if oy > 0 else 0)
                ec0, ec1 = c0 - (ext if ox < 0 else 0), c1 + (ext if ox > 0 else 0)
                big = np.zeros((er1 - er0, ec1 - ec0))
                big[r0 - er0 : r1 - er0, c0 - ec0 : c1 - ec0] = patch
                visible = np.zeros_like(big, dtype=bool)
                visible[r0 - er0 : r1 - er0, c0 - ec0 : c1 - ec0] = True
                if factor > 1:  # blocks end on the image border, so each is wholly visible or hidden
                    edge = (r1 - er0 if oy > 0 else r0 - er0, c1 - ec0 if ox > 0 else c0 - ec0)
                    big, visible = _blocks(big, factor, edge), _blocks(visible, factor, edge, "all")
                norm = math.hypot(ox, oy)
                scores = classify(
                    big, np.arange(big.shape[0]), np.arange(big.shape[1]), visible, (ox / norm, oy / norm)
                )
            elif factor > 1:
                small = _blocks(patch, factor, (0, 0))
                scores = classify(small, np.arange(small.shape[0]), np.arange(small.shape[1]))
            else:
                scores = classify(patch, rows, cols)
            best = max(scores, key=scores.get)
            confidence = scores[best]
            objects.append(
                DetectedObject(
                    shape=best if confidence >= config.min_confidence else None,
                    color=color,
                    confidence=confidence,
                    x=float(cx / w),
                    y=float(cy / h),
                    box=(sl[1].start / w, sl[0].start / h, sl[1].stop / w, sl[0].stop / h),
                    area=float(total / (h * w)),
                    scores=scores,
                )
            )
    objects.sort(key=lambda o: -o.confidence)
    return objects
