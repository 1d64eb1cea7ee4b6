"""Multi-image prompts: 2-4 labelled single-object images and questions about one of them.

The prompt is `[INTRO, label_1, image_1, (text_1,) label_2, image_2, ...] + [question]` (what the multi-image
tasks of kvpress_mm.eval render, joined with "\\n" by the processor). The image a question is about is
identified either
  * by its label: "Image 2" (labels "Image k:") or a name ("Marta's picture:"): `label_questions`;
  * or by being the only image of its kind: the only digit among shapes, the only shape among digits, the
    only star among other shapes: `unique_questions`;
or the question counts the images of one kind (the digits among shapes): `count_question`.
Answers are one word / digit, as in `questions.py`. Training (kvpress_mm.training.data) and the tasks
(image_needle, image_lookup, image_counting) share these phrasings.
"""

from __future__ import annotations

from .questions import QA
from .scenes import Scene

INTRO = "Here are some images."
# names for "<name>'s picture:" labels (the filler text of the tasks never uses them)
LABEL_NAMES = (
    "Marta",
    "Tobias",
    "Greta",
    "Samuel",
    "Nadia",
    "Victor",
    "Elena",
    "Bruno",
    "Clara",
    "Dmitri",
    "Sofia",
    "Ingrid",
    "Rafael",
    "Yuki",
    "Lars",
    "Amara",
)
UNIQUE_KINDS = ("digit", "shape", "star")


def index_label(k: int) -> tuple[str, str]:
    """(label before the image, how a question refers to it) for image k (0-based): ("Image 2:", "Image 2")."""
    return f"Image {k + 1}:", f"Image {k + 1}"


def name_label(name: str) -> tuple[str, str]:
    """("Marta's picture:", "Marta's picture")."""
    return f"{name}'s picture:", f"{name}'s picture"


def object_of(scene: Scene):
    """The one object of a single-object scene."""
    if len(scene.objects) != 1:
        raise ValueError(f"expected a single-object scene, got {len(scene.objects)} objects")
    return scene.objects[0]


def label_questions(scene: Scene, ref: str) -> list[QA]:
    """Questions about the single-object image that `ref` ("Image 2", "Marta's picture") names: its colour,
    and its shape or digit."""
    obj = object_of(scene)
    noun = "shape" if obj.kind == "shape" else obj.kind
    out = [QA(f"What colour is the {noun} in {ref}?", obj.color, "colour", obj.color)]
    if obj.kind == "shape":
        out.append(QA(f"What shape is shown in {ref}?", obj.shape, "shape", obj.shape))
    elif obj.kind == "digit":
        out.append(QA(f"What digit is shown in {ref}?", obj.text, "digit", obj.text))
    return out


def unique_kind(scene: Scene) -> str:
    """ "digit", "star" or "shape": what makes this image the needle among images of another kind."""
    obj = object_of(scene)
    if obj.kind == "digit":
        return "digit"
    return "star" if obj.shape == "star" else "shape"


def unique_questions(scene: Scene, kind: str) -> list[QA]:
    """Questions about the only image of `kind` ("digit": the only digit among shapes; "shape": the only shape
    among digits; "star": the only star among other shapes)."""
    obj = object_of(scene)
    if kind == "digit":
        lead = "One of the images shows a digit."
        return [
            QA(f"{lead} Which digit is it?", obj.text, "digit", obj.text),
            QA(f"{lead} What colour is the digit?", obj.color, "colour", obj.color),
        ]
    if kind == "shape":
        lead = "One of the images shows a shape."
        return [
            QA(f"{lead} Which shape is it?", obj.shape, "shape", obj.shape),
            QA(f"{lead} What colour is the shape?", obj.color, "colour", obj.color),
        ]
    if kind == "star":
        return [QA("One of the images shows a star. What colour is the star?", obj.color, "colour", obj.color)]
    raise ValueError(f"unknown needle kind {kind!r}; known: {UNIQUE_KINDS}")


def count_question(what: str = "a digit") -> str:
    """ "How many of the images show a digit?" (what: "a digit", "a red shape", ...)."""
    return f"How many of the images show {what}? Answer with a number."


def fits_haystack(scene: Scene, kind: str) -> bool:
    """Whether a single-object scene may stand next to a needle of `kind` (it must not be of that kind)."""
    obj = object_of(scene)
    if kind == "digit":
        return obj.kind == "shape"
    if kind == "shape":
        return obj.kind == "digit"
    return obj.kind == "shape" and obj.shape != "star"
