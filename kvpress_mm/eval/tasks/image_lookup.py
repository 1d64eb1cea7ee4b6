"""image_lookup: a question about the image that a text label names, among num_images labelled images.

Each image shows one object and comes after its label, "<name>'s picture:" (cue="name": Marta, Tobias, ...) or
"Image k:" (cue="index"), with filler text between the images (context_tokens in total, split evenly after
the images); the question names one label (MileBench-style multi-image retrieval keyed by text):
  * question="shape":  "What shape is shown in Marta's picture?" (all images show distinct shapes)
  * question="colour": "What colour is the shape in Marta's picture?" (distinct shapes and colours)
  * question="digit":  "What digit is shown in Marta's picture?" (all images show distinct digits)
  * question="mixed":  shape and colour in turn (sample i: shape for even i, colour for odd i)
Every image has its own answer, so an answer read off another image is wrong (chance 1 / num_images when the
model just names one of the objects). Defaults: 3 images, names, 200 filler tokens, ~1000 prompt tokens. With
mini_llava the full cache scores at chance (it does not bind a label to the image after it; docs/projector.md):
the task is meant for larger models. Score: 1 if the answer contains the
expected word / digit and no other candidate of its type.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvpress_mm.vision_data import COLORS, DIGITS, SHAPES, multi

from ..sample import Question, Sample
from . import register_task
from .base import Task
from .filler import approx_tokens, split_even
from .image_common import clean_filler, labelled_images, score_object_answer, task_scene

QUESTION_TYPES = ("shape", "colour", "digit")
CUES = ("name", "index")


@register_task("image_lookup")
@dataclass
class ImageLookup(Task):
    """num_images labelled images; the question is about the one at relative position target_position (None =
    random). num_questions > 1 also asks, in turn, about that many other images of the same set (one
    context, several questions: the question-agnostic protocol compresses it once for all)."""

    n_samples: int = 20
    seed: int = 0
    num_images: int = 3
    cue: str = "name"
    question: str = "mixed"
    context_tokens: int = 200
    target_position: float | None = None
    max_new_tokens: int = 12
    num_questions: int = 1

    def __post_init__(self):
        super().__post_init__()
        self._check_int("num_images", 1)
        self._check_int("num_questions", 1)
        if self.num_questions > self.num_images:
            raise ValueError(
                f"ImageLookup: num_questions must be at most num_images={self.num_images} (one image per "
                f"question), got {self.num_questions}"
            )
        self._check_int("context_tokens", 0)
        self._check_choice("cue", CUES)
        self._check_choice("question", QUESTION_TYPES + ("mixed",))
        limit = len(DIGITS) if self.question == "digit" else len(SHAPES)
        if self.num_images > limit:
            raise ValueError(
                f"ImageLookup: at most {limit} images for question={self.question!r} (distinct answers), "
                f"got {self.num_images}"
            )
        if self.target_position is not None:
            self._check_fraction("target_position", self.target_position)

    def samples(self) -> list[Sample]:
        return [self._sample(i) for i in range(self.n_samples)]

    def _sample(self, i: int) -> Sample:
        rng = random.Random(f"image_lookup:{self.seed}:{i}")
        n = self.num_images
        qtype = ("shape", "colour")[i % 2] if self.question == "mixed" else self.question
        target = rng.randrange(n) if self.target_position is None else min(n - 1, int(self.target_position * n))
        colors = rng.sample(tuple(COLORS), n)
        if qtype == "digit":
            scenes = [
                task_scene("image_lookup", self.seed, i, k, "single_digit", digit=d, color=c)
                for k, (d, c) in enumerate(zip(rng.sample(DIGITS, n), colors))
            ]
        else:
            scenes = [
                task_scene("image_lookup", self.seed, i, k, "single_shape", shape=s, color=c)
                for k, (s, c) in enumerate(zip(rng.sample(SHAPES, n), colors))
            ]
        if self.cue == "name":
            labels = [multi.name_label(name) for name in rng.sample(multi.LABEL_NAMES, n)]
        else:
            labels = [multi.index_label(k) for k in range(n)]
        texts = None
        if self.context_tokens:
            sentences = clean_filler(rng, self.context_tokens)
            texts = [" ".join(part) for part in split_even(sentences, n)]
        qa = next(q for q in multi.label_questions(scenes[target], labels[target][1]) if q.qtype == qtype)
        content = (
            [multi.INTRO]
            + labelled_images([s.image for s in scenes], texts=texts, labels=[lab for lab, _ in labels])
            + [qa.question]
        )
        more = []
        for k in [k for k in range(n) if k != target][: self.num_questions - 1]:
            other = next(q for q in multi.label_questions(scenes[k], labels[k][1]) if q.qtype == qtype)
            more.append(Question(other.question, other.answer, {"target_image": k + 1, "label": labels[k][1]}))
        return Sample(
            id=f"image_lookup-{self.seed}-{i}",
            content=content,
            answer=qa.answer,
            meta={
                "qtype": qtype,
                "cue": self.cue,
                "target_image": target + 1,
                "label": labels[target][1],
                "num_images": n,
                "others": [
                    multi.object_of(s).color
                    if qtype == "colour"
                    else multi.object_of(s).shape
                    if qtype == "shape"
                    else multi.object_of(s).text
                    for k, s in enumerate(scenes)
                    if k != target
                ],
                "approx_text_tokens": sum(approx_tokens(t) for t in content if isinstance(t, str)),
            },
            more_questions=more,
        )

    def score(self, sample: Sample, prediction: str) -> float:
        qtype = sample.meta["qtype"]
        return score_object_answer(qtype, sample.answer, prediction)
