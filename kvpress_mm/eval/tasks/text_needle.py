"""text_needle: find one fact ("The secret code of <name> is <4 digits>.") in a long image-text document.

Inspired by MileBench's diagnostic needle-in-a-haystack task (text needle, several images in the haystack).
Score: 1 if the code appears (as a whole number) in the answer, else 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..sample import Question, Sample
from . import register_task
from .base import Task, contains_number
from .filler import FACT_NAMES, approx_tokens, filler_sentences, random_code
from .layout import insert_at_depths, interleave

INTRO = "Read the following document. It contains text and images."


@register_task("text_needle")
@dataclass
class TextNeedle(Task):
    """n_samples documents of ~context_tokens filler tokens with num_images images spread through them; the
    needle sits at relative depth needle_depth (0 = start, 1 = end; None = uniform random per sample).

    num_questions > 1 hides that many needles (distinct names, random depths) and asks about each one in
    turn: one context, several questions (the question-agnostic protocol compresses it once for all)."""

    n_samples: int = 20
    seed: int = 0
    num_images: int = 3
    context_tokens: int = 1000
    needle_depth: float | None = None
    max_new_tokens: int = 16
    num_questions: int = 1

    def __post_init__(self):
        super().__post_init__()
        self._check_int("num_questions", 1)
        if self.num_questions > len(FACT_NAMES):
            raise ValueError(
                f"{type(self).__name__}: num_questions must be at most {len(FACT_NAMES)} (one name per needle), "
                f"got {self.num_questions}"
            )
        self._check_int("num_images", 0)
        self._check_int("context_tokens", 1)
        if self.needle_depth is not None:
            self._check_fraction("needle_depth", self.needle_depth)

    def samples(self) -> list[Sample]:
        return [self._sample(i) for i in range(self.n_samples)]

    def _sample(self, i: int) -> Sample:
        rng = random.Random(self.seed * 1_000_003 + i)
        name = rng.choice(FACT_NAMES)
        code = random_code(rng)
        depth = rng.random() if self.needle_depth is None else float(self.needle_depth)
        needle = f"The secret code of {name} is {code}."
        sentences = filler_sentences(rng, self.context_tokens)
        # further needles are drawn after the first one's draws, so num_questions=1 samples stay as they were
        others = [n for n in FACT_NAMES if n != name]
        extra = [(n, random_code(rng), rng.random()) for n in rng.sample(others, self.num_questions - 1)]
        facts = [(depth, needle)] + [(d, f"The secret code of {n} is {c}.") for n, c, d in extra]
        sentences, (index, *_) = insert_at_depths(sentences, facts)
        question = f"What is the secret code of {name}? Answer with the code."
        content = interleave(INTRO, sentences, self.num_images, question, rng)
        more = [
            Question(f"What is the secret code of {n}? Answer with the code.", c, {"name": n, "depth": d})
            for n, c, d in extra
        ]
        return Sample(
            id=f"text_needle-{self.seed}-{i}",
            content=content,
            answer=code,
            meta={
                "name": name,
                "depth": depth,
                "needle": needle,
                "needle_sentence": index,
                "num_sentences": len(sentences),
                "approx_text_tokens": sum(approx_tokens(t) for t in content if isinstance(t, str)),
            },
            more_questions=more,
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return float(contains_number(prediction, sample.answer))
