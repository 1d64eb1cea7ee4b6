"""Synthetic image / text data made locally with Pillow (deterministic by seed).

* `scenes`: coloured shapes, digits and short words at random places (`make_scene`, `scene_stream`);
* `questions`: captions and question / answer pairs about a scene (`questions_for`, `caption`);
* `multi`: multi-image prompts (labelled images, questions about one of them).
"""

from . import multi
from .questions import (
    NUMBER_WORDS,
    NUMBER_WORDS_MAP,
    QA,
    QTYPES,
    answer_matches,
    caption,
    exclusive_match,
    questions_for,
)
from .scenes import (
    COLORS,
    DIGITS,
    IMAGE_SIZE,
    KINDS,
    SHAPES,
    WORDS,
    Scene,
    SceneObject,
    make_scene,
    scene_seed,
    scene_stream,
)

__all__ = [
    "COLORS",
    "DIGITS",
    "NUMBER_WORDS",
    "NUMBER_WORDS_MAP",
    "IMAGE_SIZE",
    "KINDS",
    "QA",
    "QTYPES",
    "SHAPES",
    "WORDS",
    "Scene",
    "SceneObject",
    "answer_matches",
    "multi",
    "caption",
    "exclusive_match",
    "make_scene",
    "questions_for",
    "scene_seed",
    "scene_stream",
]
