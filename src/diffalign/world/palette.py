"""The vocabulary of the Shapes world: colours, shapes, counts and relations.

These constants are the whole world: the renderer draws them, the detector reads them back, the
prompt grammar names them. They follow ../DESIGN.md ("The Shapes world").
"""

from __future__ import annotations

import numpy as np

#: Colour name -> RGB (0-255). Order matters: it is the colour index used in tensors.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND_RGB: tuple[int, int, int] = (255, 255, 255)

#: Shape names; the index is the shape id used in tensors.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}

#: Count words of the counting category (GenEval counts 2 to 4); "one" is only in the vocabulary.
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
MIN_COUNT, MAX_COUNT = 1, 4

#: Spatial relations, as GenEval spells them.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: GenEval's six task tags, in GenEval's order.
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

DEFAULT_CANVAS_SIZE = 32


def palette_array() -> np.ndarray:
    """The palette as a float array [n_colors, 3] in [0, 1]."""
    return np.asarray(list(PALETTE.values()), dtype=np.float64) / 255.0


def with_article(word: str) -> str:
    """'a circle', 'an orange circle' (GenEval's rule: 'an' before a vowel)."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"
