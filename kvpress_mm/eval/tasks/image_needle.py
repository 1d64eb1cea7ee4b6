"""image_needle: the one image (of num_images) that differs in kind, MileBench "image needle in a haystack" style.

Every image shows one object; the images are labelled "Image k:" and separated by filler text (context_tokens
in total, split evenly after the images). The needle image is the only one of its kind:
  * needle="shape": the only shape (circle / square / triangle / star) among digit images;
  * needle="digit": the only digit among shape images;
  * needle="star":  the only star among other shapes (circles, squares, triangles).
The question (the phrasings of `kvpress_mm.vision_data.multi`, which mini_llava's projector was trained on) asks
  * ask="content": what the needle is: its shape ("One of the images shows a shape. Which shape is it?"), its
    digit, or for the star its colour;
  * ask="colour": its colour;
  * ask="index":  which image it is (answer: the image number; hard for SmolLM2-135M, see docs/projector.md).
No haystack image has the needle's colour, so a colour answer taken from another image is wrong.
Defaults (3 images, shape needle, 200 filler tokens, ~1000 prompt tokens) were calibrated on mini_llava with
the shipped projector (full-cache scores in docs/projector.md). Score: 1 if the answer contains the expected
shape / digit / colour / image number and no other candidate of that type.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvpress_mm.vision_data import COLORS, DIGITS, SHAPES, multi

from ..sample import Sample
from . import register_task
from .base import Task
from .filler import approx_tokens, split_even
from .image_common import (
    clean_filler,
    image_index_in,
    labelled_images,
    score_object_answer,
    task_scene,
)

HAYSTACK_SHAPES = ("circle", "square", "triangle")
NEEDLES = ("shape", "digit", "star")
ASKS = ("content", "colour", "index")
CONTENT_QTYPE = {"shape": "shape", "digit": "digit", "star": "colour"}


@register_task("image_needle")
@dataclass
class ImageNeedle(Task):
    """num_images images, one of them the needle (at relative position needle_position, None = random)."""

    n_samples: int = 20
    seed: int = 0
    num_images: int = 3
    needle: str = "shape"
    ask: str = "content"
    context_tokens: int = 200
    needle_position: float | None = None
    max_new_tokens: int = 12

    def __post_init__(self):
        super().__post_init__()
        self._check_int("num_images", 1)
        self._check_int("context_tokens", 0)
        self._check_choice("needle", NEEDLES)
        self._check_choice("ask", ASKS)
        if self.num_images > len(COLORS):
            raise ValueError(f"ImageNeedle: at most {len(COLORS)} images (one colour each), got {self.num_images}")
        if self.needle_position is not None:
            self._check_fraction("needle_position", self.needle_position)

    def samples(self) -> list[Sample]:
        return [self._sample(i) for i in range(self.n_samples)]

    def _qtype(self) -> str:
        return {"content": CONTENT_QTYPE[self.needle], "colour": "colour", "index": "index"}[self.ask]

    def _sample(self, i: int) -> Sample:
        rng = random.Random(f"image_needle:{self.seed}:{i}")
        n = self.num_images
        pos = rng.randrange(n) if self.needle_position is None else min(n - 1, int(self.needle_position * n))
        colors = rng.sample(tuple(COLORS), n)  # one colour per image: the needle's colour is unique
        scenes = []
        for k in range(n):
            opts = {"color": colors[k]}
            if k == pos:
                if self.needle == "digit":
                    kind = "single_digit"
                    opts["digit"] = rng.choice(DIGITS)
                else:
                    kind = "single_shape"
                    opts["shape"] = "star" if self.needle == "star" else rng.choice(SHAPES)
            elif self.needle == "shape":
                kind = "single_digit"
                opts["digit"] = rng.choice(DIGITS)
            else:
                kind = "single_shape"
                opts["shape"] = rng.choice(HAYSTACK_SHAPES)
            scenes.append(task_scene("image_needle", self.seed, i, k, kind, **opts))
        texts = None
        if self.context_tokens:
            sentences = clean_filler(rng, self.context_tokens)
            texts = [" ".join(part) for part in split_even(sentences, n)]
        qtype = self._qtype()
        if qtype == "index":
            what = {"shape": "a shape", "digit": "a digit", "star": "a star"}[self.needle]
            question, answer = (
                f"One of the images shows {what}. Which image is it? Answer with the image number.",
                str(pos + 1),
            )
        else:
            qa = next(q for q in multi.unique_questions(scenes[pos], self.needle) if q.qtype == qtype)
            question, answer = qa.question, qa.answer
        content = [multi.INTRO] + labelled_images([s.image for s in scenes], texts=texts) + [question]
        return Sample(
            id=f"image_needle-{self.seed}-{i}",
            content=content,
            answer=answer,
            meta={
                "needle": self.needle,
                "qtype": qtype,
                "needle_image": pos + 1,
                "num_images": n,
                "approx_text_tokens": sum(approx_tokens(t) for t in content if isinstance(t, str)),
            },
        )

    def score(self, sample: Sample, prediction: str) -> float:
        qtype = sample.meta["qtype"]
        if qtype == "index":
            return float(image_index_in(prediction) == int(sample.answer))
        return score_object_answer(qtype, sample.answer, prediction)
