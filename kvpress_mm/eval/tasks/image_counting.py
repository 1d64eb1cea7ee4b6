"""image_counting: count, across num_images images, those that show X (MileBench-style multi-image counting).

Each image shows either a target or not:
  * target="digit":  digit images (one large digit) among single-shape images -> "How many of the images show a digit?"
  * target=<colour> (e.g. "red"): images with one shape of that colour among images with one shape of another
    colour -> "How many of the images show a red shape?"
The count is drawn uniformly from [min_count, max_count] (max_count None = num_images). Images are labelled
"Image k:" and may be separated by filler text (context_tokens in total). Score: 1 if the first number in the
answer (references to images, "image 3", ignored; number words accepted) equals the count.

Note: counting is the weakest skill of SmolLM2-135M (mini_llava's language model): even with the images
replaced by text descriptions it answers "how many of these show a circle?" at about chance, and training the
projector on counting questions did not change that: with mini_llava the full cache scores at chance (see
docs/projector.md). The task is meant for larger models.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvpress_mm.vision_data import COLORS, SHAPES, multi

from ..sample import Sample
from . import register_task
from .base import Task
from .filler import approx_tokens, split_even
from .image_common import clean_filler, labelled_images, numbers_in, task_scene


@register_task("image_counting")
@dataclass
class ImageCounting(Task):
    n_samples: int = 20
    seed: int = 0
    num_images: int = 3
    target: str = "digit"
    min_count: int = 1
    max_count: int | None = None
    context_tokens: int = 0
    max_new_tokens: int = 12

    def __post_init__(self):
        super().__post_init__()
        self._check_int("num_images", 1)
        self._check_int("context_tokens", 0)
        self._check_int("min_count", 0)
        if self.max_count is not None:
            self._check_int("max_count", self.min_count)
        if self._max() > self.num_images or self.min_count > self._max():
            raise ValueError(
                f"ImageCounting: need min_count <= max_count <= num_images, got "
                f"{self.min_count}, {self.max_count}, {self.num_images}"
            )
        if self.target != "digit" and self.target not in COLORS:
            raise ValueError(
                f"ImageCounting: target must be 'digit' or a colour ({', '.join(COLORS)}), got {self.target!r}"
            )

    def _max(self) -> int:
        return self.num_images if self.max_count is None else self.max_count

    def samples(self) -> list[Sample]:
        return [self._sample(i) for i in range(self.n_samples)]

    def _sample(self, i: int) -> Sample:
        rng = random.Random(f"image_counting:{self.seed}:{i}")
        n = self.num_images
        count = rng.randint(self.min_count, self._max())
        hits = set(rng.sample(range(n), count))
        others = tuple(c for c in COLORS if c != self.target)
        images = []
        for k in range(n):
            if self.target == "digit":
                if k in hits:
                    scene = task_scene("image_counting", self.seed, i, k, "single_digit")
                else:
                    scene = task_scene("image_counting", self.seed, i, k, "single_shape", shape=rng.choice(SHAPES))
            else:
                color = self.target if k in hits else rng.choice(others)
                scene = task_scene(
                    "image_counting", self.seed, i, k, "single_shape", color=color, shape=rng.choice(SHAPES)
                )
            images.append(scene.image)
        texts = None
        if self.context_tokens:
            sentences = clean_filler(rng, self.context_tokens)
            texts = [" ".join(part) for part in split_even(sentences, n)]
        what = "a digit" if self.target == "digit" else f"a {self.target} shape"
        question = multi.count_question(what)
        content = [multi.INTRO] + labelled_images(images, texts=texts) + [question]
        return Sample(
            id=f"image_counting-{self.seed}-{i}",
            content=content,
            answer=str(count),
            meta={
                "target": self.target,
                "hit_images": sorted(k + 1 for k in hits),
                "num_images": n,
                "approx_text_tokens": sum(approx_tokens(t) for t in content if isinstance(t, str)),
            },
        )

    def score(self, sample: Sample, prediction: str) -> float:
        numbers = numbers_in(prediction)
        return float(bool(numbers) and numbers[0] == int(sample.answer))
