"""Images as a viewer (and so a rater or a grader) sees them, whatever program wrote them."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

_ORIENTATION = 0x0112  # the EXIF orientation tag
_WHITE = (255, 255, 255, 255)


def displayed_rgb(im: Image.Image) -> Image.Image:
    """`im` as a viewer shows it, in 8-bit RGB: turned by its EXIF orientation, 16-bit grey scaled to 8
    bits (PIL's own conversion clips it, turning most of the picture white), and transparent pixels
    composited onto white (the colour they hide is arbitrary)."""
    sixteen_bit = im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")  # older PIL: I
    if im.getexif().get(_ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)
    if sixteen_bit:
        grey = np.asarray(im).astype(np.float32)
        im = Image.fromarray(np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, _WHITE), im.convert("RGBA"))
    return im.convert("RGB")


def fit_square(im: Image.Image, size: int) -> Image.Image:
    """`im` brought to size x size as Diffusion-DPO's and CLIP's preprocessing do: scaled (bicubic) so its
    shorter side is `size`, then its centre cropped; a non-square image is not squashed, and an image
    already of that size is returned as it is."""
    if im.size == (size, size):
        return im
    return ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC, centering=(0.5, 0.5))
