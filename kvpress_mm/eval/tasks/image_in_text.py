"""image_in_text: a question about the one image placed among long text passages (MileBench-style).

A document of ~context_tokens filler tokens holds one image at relative depth image_depth (None = random per
sample); the question at the end asks about it:
  * question="colour": the image shows one shape or digit -> "What colour is the shape / digit in the image?"
  * question="shape":  the image shows one shape -> "What shape is shown in the image?"
  * question="digit":  the image shows one digit -> "What digit is shown in the image?"
  * question="mixed":  the three in turn (sample i gets colour, shape, digit for i % 3 = 0, 1, 2)
The default context (300 filler tokens, ~610 prompt tokens) was calibrated on mini_llava with the shipped
projector (full-cache accuracy falls with the context: see docs/projector.md).
Score: 1 if the answer contains the expected word (whole word, case-insensitive) and no other candidate of the
same type (no other colour / shape / digit).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvpress_mm.vision_data import COLORS, DIGITS, SHAPES

from ..sample import Sample
from . import register_task
from .base import Task
from .filler import approx_tokens
from .image_common import clean_filler, score_object_answer, task_scene

INTRO = "Read the following document. It contains text and one image."
QUESTION_TYPES = ("colour", "shape", "digit")
VOCABULARY = {"colour": tuple(COLORS), "shape": SHAPES, "digit": DIGITS}


@register_task("image_in_text")
@dataclass
class ImageInText(Task):
    n_samples: int = 21
    seed: int = 0
    context_tokens: int = 300
    image_depth: float | None = None
    question: str = "mixed"
    max_new_tokens: int = 12

    def __post_init__(self):
        super().__post_init__()
        self._check_int("context_tokens", 0)
        if self.image_depth is not None:
            self._check_fraction("image_depth", self.image_depth)
        self._check_choice("question", QUESTION_TYPES + ("mixed",))

    def samples(self) -> list[Sample]:
        return [self._sample(i) for i in range(self.n_samples)]

    def _sample(self, i: int) -> Sample:
        rng = random.Random(f"image_in_text:{self.seed}:{i}")
        qtype = QUESTION_TYPES[i % 3] if self.question == "mixed" else self.question
        if qtype == "shape" or (qtype == "colour" and rng.random() < 0.5):
            scene = task_scene("image_in_text", self.seed, i, 0, "single_shape")
        else:
            scene = task_scene("image_in_text", self.seed, i, 0, "single_digit")
        obj = scene.objects[0]
        noun = "shape" if obj.kind == "shape" else "digit"
        if qtype == "colour":
            question, answer = f"What colour is the {noun} in the image? Answer with one word.", obj.color
        elif qtype == "shape":
            question, answer = "What shape is shown in the image? Answer with one word.", obj.shape
        else:
            question, answer = "What digit is shown in the image? Answer with the digit.", obj.text
        depth = rng.random() if self.image_depth is None else float(self.image_depth)
        sentences = clean_filler(rng, self.context_tokens) if self.context_tokens else []
        cut = round(depth * len(sentences))
        before, after = " ".join(sentences[:cut]), " ".join(sentences[cut:])
        content = [f"{INTRO}\n\n{before}" if before else INTRO, scene.image]
        if after:
            content.append(after)
        content.append(question)
        return Sample(
            id=f"image_in_text-{self.seed}-{i}",
            content=content,
            answer=answer,
            meta={
                "qtype": qtype,
                "depth": depth,
                "image_sentence": cut,
                "num_sentences": len(sentences),
                "approx_text_tokens": sum(approx_tokens(t) for t in content if isinstance(t, str)),
            },
        )

    def score(self, sample: Sample, prediction: str) -> float:
        qtype = sample.meta["qtype"]
        return score_object_answer(qtype, sample.answer, prediction)
