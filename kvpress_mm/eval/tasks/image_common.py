"""Shared pieces of the image-grounded tasks (image_needle, image_lookup, image_in_text).

Images come from `kvpress_mm.vision_data` (the scenes mini_llava's projector is trained on; the task seeds
are disjoint from the training scene seeds). Answers are scored by whole-word matching; numbers that refer to
images ("image 3", "Image 3:") are ignored when reading a number out of an answer.
"""

from __future__ import annotations

import random
import re

from kvpress_mm.vision_data import (
    COLORS,
    NUMBER_WORDS_MAP,
    SHAPES,
    exclusive_match,
    make_scene,
)

# scene seeds of the tasks: scene_seed-like, far from the training streams (seed * 10M + i, small seeds)
TASK_SCENE_BASE = 5_000_000_000


def task_scene(task: str, seed: int, index: int, slot: int, kind: str, **options):
    """A scene for `task`'s sample `index` (of task seed `seed`), image `slot`: deterministic and disjoint
    from the training scenes."""
    tag = sum(ord(c) for c in task) % 97
    s = TASK_SCENE_BASE + ((tag * 1_000 + seed) * 100_000 + index) * 64 + slot
    return make_scene(s, kind, **options)


_IMAGE_REF = re.compile(r"\bimages?\s*(?:number\s*|no\.?\s*|#\s*)?\d+", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.])\d+(?![\d])")


def numbers_in(prediction: str, words: bool = True) -> list[int]:
    """The numbers in an answer, in order, ignoring references to images ("image 3"); when the answer has no
    digits, number words ("two") count instead (if `words`)."""
    text = _IMAGE_REF.sub(" ", prediction)
    found: list[tuple[int, int]] = [(m.start(), int(m.group())) for m in _NUMBER.finditer(text)]
    if words and not found:
        for word, value in NUMBER_WORDS_MAP.items():
            for m in re.finditer(rf"(?<![a-z]){word}(?![a-z])", text.lower()):
                found.append((m.start(), value))
    return [v for _, v in sorted(found)]


def image_index_in(prediction: str) -> int | None:
    """The image number an answer names: "Image 3", "image number 3", "the third image" or a bare "3"."""
    m = re.search(r"\bimages?\s*(?:number\s*|no\.?\s*|#\s*)?(\d+)", prediction, re.IGNORECASE)
    if m:
        return int(m.group(1))
    ordinals = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
    low = prediction.lower()
    for k, w in enumerate(ordinals):
        if re.search(rf"\b{w}\b", low):
            return k + 1
    m = _NUMBER.search(prediction)
    return int(m.group()) if m else None


def labelled_images(
    images, rng: random.Random | None = None, texts: list[str] | None = None, labels: list[str] | None = None
) -> list:
    """["Image 1:", img_1, (text_1,) "Image 2:", img_2, ...]: each image after its label (default "Image k:"; e.g.
    "Marta's picture:"), and optional text passages after each image."""
    out: list = []
    for k, img in enumerate(images):
        out.append(labels[k] if labels else f"Image {k + 1}:")
        out.append(img)
        if texts and texts[k]:
            out.append(texts[k])
    return out


def clean_filler(rng: random.Random, target_tokens: int) -> list[str]:
    """Filler sentences (tasks/filler.py) totalling ~target_tokens tokens, without any word the image
    questions may answer with (palette colours, shape names: "the market square" is dropped too), so that
    the text never hints at or competes with the image's answer."""
    from kvpress_mm.vision_data import COLORS, SHAPES

    from .filler import approx_tokens, filler_sentences

    banned = re.compile(r"\b(" + "|".join(list(COLORS) + list(SHAPES) + ["digit", "number"]) + r")s?\b", re.IGNORECASE)
    out: list[str] = []
    total = 0
    while total < target_tokens:
        for s in filler_sentences(rng, max(64, target_tokens - total)):
            if banned.search(s):
                continue
            out.append(s)
            total += approx_tokens(s)
            if total >= target_tokens:
                break
    return out


def score_object_answer(qtype: str, answer: str, prediction: str) -> float:
    """1.0 if `prediction` names the expected colour / shape / digit and no other one of its kind."""
    if qtype == "digit":
        digits = [v for v in numbers_in(prediction) if v < 10]
        return float(bool(digits) and all(v == int(answer) for v in digits))
    vocabulary = tuple(COLORS) if qtype == "colour" else SHAPES
    return float(exclusive_match(prediction, answer, vocabulary))
