"""image_needle: find the one image (of num_images) that shows X, MileBench "image needle in a haystack" style.

The haystack images show only plain shapes (circles, squares, triangles; no digits, no stars). The needle
image shows
  * needle="digit": one large digit -> "One of the images shows a digit. Which digit is it?" (answer: the digit)
  * needle="star":  a star (alone) -> "One of the images shows a star. What colour is the star?" (answer: colour)
With ask="index" the question is instead "Which image shows a digit / a star?" (answer: the image number;
harder: SmolLM2-135M rarely answers with an index even when the images are described in words).

Defaults (3 images, star needle) were calibrated on mini_llava with the shipped projector; see
docs/projector.md for the full-cache scores (multi-image prompts are the projector's weak spot).
Images are labelled "Image k:" and may be separated by filler text (context_tokens in total). Score: 1 if the
answer contains the expected digit / colour / image number and no other candidate (numbers that refer to
images, "image 3", are ignored for digits).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvpress_mm.vision_data import COLORS, exclusive_match

from ..sample import Sample
from . import register_task
from .base import Task
from .filler import approx_tokens, split_even
from .image_common import clean_filler, image_index_in, labelled_images, numbers_in, task_scene

INTRO = "Here are some images."
HAYSTACK_SHAPES = ("circle", "square", "triangle")


@register_task("image_needle")
@dataclass
class ImageNeedle(Task):
    """num_images images, one of them the needle (at relative position needle_position, None = random)."""

    n_samples: int = 20
    seed: int = 0
    num_images: int = 3
    needle: str = "star"
    ask: str = "content"
    context_tokens: int = 0
    needle_position: float | None = None
    max_new_tokens: int = 12

    def __post_init__(self):
        super().__post_init__()
        self._check_int("num_images", 1)
        self._check_int("context_tokens", 0)
        if self.needle not in ("digit", "star"):
            raise ValueError(f"ImageNeedle: needle must be 'digit' or 'star', got {self.needle!r}")
        if self.ask not in ("content", "index"):
            raise ValueError(f"ImageNeedle: ask must be 'content' or 'index', got {self.ask!r}")
        if self.needle_position is not None:
            self._check_fraction("needle_position", self.needle_position)

    def samples(self) -> list[Sample]:
        return [self._sample(i) for i in range(self.n_samples)]

    def _sample(self, i: int) -> Sample:
        rng = random.Random(f"image_needle:{self.seed}:{i}")
        n = self.num_images
        pos = rng.randrange(n) if self.needle_position is None else min(n - 1, int(self.needle_position * n))
        images = []
        for k in range(n):
            if k == pos:
                if self.needle == "digit":
                    digit = str(rng.randrange(10))
                    scene = task_scene("image_needle", self.seed, i, k, "single_digit", digit=digit)
                    content_answer = digit
                else:
                    color = rng.choice(tuple(COLORS))
                    scene = task_scene("image_needle", self.seed, i, k, "single_shape", shape="star", color=color)
                    content_answer = color
            else:
                scene = task_scene("image_needle", self.seed, i, k, "shapes", shapes=HAYSTACK_SHAPES,
                                   n_objects=rng.randrange(1, 4))
            images.append(scene.image)
        texts = None
        if self.context_tokens:
            sentences = clean_filler(rng, self.context_tokens)
            texts = [" ".join(part) for part in split_even(sentences, n)]
        what = "a digit" if self.needle == "digit" else "a star"
        if self.ask == "index":
            question = f"One of the images shows {what}. Which image is it? Answer with the image number."
            answer = str(pos + 1)
        elif self.needle == "digit":
            question = "One of the images shows a digit. Which digit is it? Answer with the digit."
            answer = content_answer
        else:
            question = "One of the images shows a star. What colour is the star? Answer with one word."
            answer = content_answer
        content = [INTRO] + labelled_images(images, texts=texts) + [question]
        return Sample(
            id=f"image_needle-{self.seed}-{i}",
            content=content,
            answer=answer,
            meta={
                "needle": self.needle,
                "ask": self.ask,
                "needle_image": pos + 1,
                "num_images": n,
                "approx_text_tokens": sum(approx_tokens(t) for t in content if isinstance(t, str)),
            },
        )

    def score(self, sample: Sample, prediction: str) -> float:
        if self.ask == "index":
            return float(image_index_in(prediction) == int(sample.answer))
        if self.needle == "digit":
            digits = [v for v in numbers_in(prediction) if v < 10]
            return float(bool(digits) and all(v == int(sample.answer) for v in digits))
        return float(exclusive_match(prediction, sample.answer, tuple(COLORS)))
