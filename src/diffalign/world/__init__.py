"""The Shapes world: a controlled text-to-image world where the truth is known.

Prompts in GenEval's six tasks (`grammar`), scenes that satisfy them (`scene`), an anti-aliased
renderer (`render`), a training-set generator (`dataset`), a detector that reads any image back into
objects (`detect`), GenEval's verdict on an image (`geneval`) and the ShapesEval set (`shapeseval`).
"""

from diffalign.world.dataset import DatasetConfig, ShapesBatch, ShapesGenerator, write_dataset
from diffalign.world.detector import DetectedObject, DetectorConfig, detect, load_image
from diffalign.world.geneval import Verdict, evaluate, relative_position, score_image
from diffalign.world.grammar import GrammarError, all_metadata, make_metadata, parse_prompt, prompt_for
from diffalign.world.palette import CATEGORIES, COLORS, PALETTE, RELATIONS, SHAPES
from diffalign.world.render import render_batch, render_scene, to_uint8
from diffalign.world.scene import LayoutConfig, Scene, SceneBatch, SceneObject, sample_scenes
from diffalign.world.shapeseval import build_shapeseval, load_shapeseval

__all__ = [
    "CATEGORIES",
    "COLORS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "DatasetConfig",
    "DetectedObject",
    "DetectorConfig",
    "GrammarError",
    "LayoutConfig",
    "Scene",
    "SceneBatch",
    "SceneObject",
    "ShapesBatch",
    "ShapesGenerator",
    "Verdict",
    "all_metadata",
    "build_shapeseval",
    "detect",
    "evaluate",
    "load_image",
    "load_shapeseval",
    "make_metadata",
    "parse_prompt",
    "prompt_for",
    "relative_position",
    "render_batch",
    "render_scene",
    "sample_scenes",
    "score_image",
    "to_uint8",
    "write_dataset",
]
