"""Captions and question / answer pairs about a `Scene` (colour, shape, digit, word, count, position).

Answers are short: one lowercase word or number ("red", "circle", "7", "3", "left"); captions are one
sentence. `QA.expected` is the word an answer must contain to count as correct (exact word match,
case-insensitive: see `answer_matches`).

    qas = questions_for(scene, random.Random(0))          # one QA per applicable type
    caption(scene)                                         # "A large red circle."
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .scenes import Scene, SceneObject

QTYPES = ("colour", "shape", "digit", "word", "count", "position", "caption")

COLOUR_TEMPLATES = (
    "What colour is the {noun}?",
    "What is the colour of the {noun}?",
    "Which colour is the {noun} in the image?",
    "What color is the {noun}?",
)
SHAPE_TEMPLATES = (
    "What shape is shown in the image?",
    "What shape is this?",
    "Which shape do you see in the image?",
    "What is the shape in the image?",
)
SHAPE_OF_COLOUR_TEMPLATES = (
    "What shape is the {color} object?",
    "Which shape is {color}?",
)
DIGIT_TEMPLATES = (
    "What digit is shown in the image?",
    "Which digit is written in the image?",
    "What number is written in the image?",
    "Read the digit in the image.",
)
WORD_TEMPLATES = (
    "What word is written in the image?",
    "Read the word in the image.",
    "Which word is shown in the image?",
)
COUNT_TEMPLATES = (
    ("How many shapes are in the image?", "shape"),
    ("How many shapes can you see?", "shape"),
    ("How many objects are in the image?", "object"),
)
HORIZONTAL_TEMPLATES = (
    "Is the {noun} on the left or on the right?",
    "Is the {noun} on the left or the right side of the image?",
)
VERTICAL_TEMPLATES = (
    "Is the {noun} at the top or at the bottom?",
    "Is the {noun} in the top or the bottom half of the image?",
)
CAPTION_TEMPLATES = ("Describe the image.", "What is in the image?", "Describe the image in one sentence.")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBER_WORDS_MAP = {w: i for i, w in enumerate(NUMBER_WORDS)}


@dataclass
class QA:
    question: str
    answer: str
    qtype: str
    expected: str

    def as_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "qtype": self.qtype, "expected": self.expected}


def _noun(obj: SceneObject) -> str:
    return "shape" if obj.kind == "shape" else obj.kind


def describe(obj: SceneObject) -> str:
    """ "a red circle", "the digit 7 in blue", "the word "cat" in green"."""
    if obj.kind == "shape":
        return f"a {obj.color} {obj.shape}"
    if obj.kind == "digit":
        return f"the digit {obj.text} in {obj.color}"
    return f'the word "{obj.text}" in {obj.color}'


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """One sentence describing the whole scene."""
    objs = scene.objects
    if not objs:
        return "An empty grey image."
    if len(objs) == 1:
        o = objs[0]
        if o.kind == "shape":
            return f"A {o.size_name} {o.color} {o.shape}."
        if o.kind == "digit":
            return f"The digit {o.text} written in {o.color}."
        return f'The word "{o.text}" written in {o.color}.'
    text = _join([describe(o) for o in objs])
    return f"{NUMBER_WORDS[len(objs)].capitalize()} objects: {text}."


def questions_for(scene: Scene, rng: random.Random, qtypes: tuple[str, ...] | None = None) -> list[QA]:
    """One QA per applicable question type (in QTYPES order), phrased with a template drawn from `rng`."""
    qtypes = qtypes or QTYPES
    out: list[QA] = []
    objs = scene.objects
    shapes = scene.of_kind("shape")
    single = objs[0] if len(objs) == 1 else None

    def add(qtype, question, answer, expected=None):
        if qtype in qtypes:
            out.append(QA(question, answer, qtype, expected or answer))

    # colour
    if single is not None:
        add("colour", rng.choice(COLOUR_TEMPLATES).format(noun=_noun(single)), single.color)
    else:
        unique = [o for o in shapes if sum(p.shape == o.shape for p in shapes) == 1]
        digits = scene.of_kind("digit")
        pool = unique + [d for d in digits if len(digits) == 1]
        if pool:
            o = rng.choice(pool)
            add("colour", rng.choice(COLOUR_TEMPLATES).format(noun=o.shape if o.kind == "shape" else o.kind), o.color)
    # shape
    if single is not None and single.kind == "shape":
        add("shape", rng.choice(SHAPE_TEMPLATES), single.shape)
    elif len(shapes) > 1:
        unique = [o for o in shapes if sum(p.color == o.color for p in objs) == 1]
        if unique:
            o = rng.choice(unique)
            add("shape", rng.choice(SHAPE_OF_COLOUR_TEMPLATES).format(color=o.color), o.shape)
    # digit / word
    digits = scene.of_kind("digit")
    if len(digits) == 1:
        add("digit", rng.choice(DIGIT_TEMPLATES), digits[0].text)
    words = scene.of_kind("word")
    if len(words) == 1:
        add("word", rng.choice(WORD_TEMPLATES), words[0].text)
    # count
    if len(objs) > 1 or (scene.kind in ("multi", "shapes") and objs):
        question, what = rng.choice(COUNT_TEMPLATES)
        n = len(shapes) if what == "shape" else len(objs)
        add("count", question, str(n))
    # position
    if single is not None:
        h, v = single.horizontal(), single.vertical()
        options = []
        if h in ("left", "right"):
            options.append((rng.choice(HORIZONTAL_TEMPLATES), h))
        if v in ("top", "bottom"):
            options.append((rng.choice(VERTICAL_TEMPLATES), v))
        if options:
            template, answer = rng.choice(options)
            add("position", template.format(noun=_noun(single)), answer)
    # caption
    add("caption", rng.choice(CAPTION_TEMPLATES), caption(scene), expected="")
    return out


def answer_matches(prediction: str, expected: str) -> bool:
    """Whether `expected` occurs in `prediction` as a whole word (case-insensitive). Digits / counts also
    match their number word ("7" ~ "seven")."""
    text = prediction.lower()
    options = {expected.lower()}
    if expected.isdigit() and int(expected) < len(NUMBER_WORDS):
        options.add(NUMBER_WORDS[int(expected)])
    if expected.lower() == "colour":
        options.add("color")
    return any(re.search(rf"(?<![a-z0-9]){re.escape(o)}(?![a-z0-9])", text) for o in options)


def exclusive_match(prediction: str, expected: str, vocabulary) -> bool:
    """`answer_matches(prediction, expected)` and no other word of `vocabulary` (the other possible answers
    of this question type, e.g. the other colours) appears in the prediction."""
    if not answer_matches(prediction, expected):
        return False
    return not any(answer_matches(prediction, w) for w in vocabulary if w.lower() != expected.lower())
