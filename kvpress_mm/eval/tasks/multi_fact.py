"""multi_fact: combine two facts placed far apart in a long image-text document (a two-hop question).

    "<name> lives in <town>."   ...   "The postal code of <town> is <4 digits>."
    Q: "What is the postal code of the town where <name> lives?"

Optional distractor pairs (other people in other towns, other towns' codes) make reading the wrong fact
possible. Score: 1 if the right code appears (as a whole number) in the answer and no distractor code does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..sample import Sample
from . import register_task
from .base import Task, contains_number
from .filler import FACT_NAMES, TOWNS, approx_tokens, filler_sentences, random_code
from .layout import insert_at_depths, interleave

INTRO = "Read the following document. It contains text and images."


@register_task("multi_fact")
@dataclass
class MultiFact(Task):
    """person_depth / code_depth: relative depths of the two facts (None: random, the two at least
    min_separation apart); distractors: extra (person, town, code) triples about other people."""

    n_samples: int = 20
    seed: int = 0
    num_images: int = 3
    # calibrated on mini_llava (full cache, 24 samples): 1000 filler tokens 0.58, 400 0.75, 250 0.79 (SmolLM2-135M
    # loses the two hops in long documents); the three images still make ~1,050-token prompts
    context_tokens: int = 250
    person_depth: float | None = None
    code_depth: float | None = None
    min_separation: float = 0.3
    distractors: int = 0
    max_new_tokens: int = 24

    def __post_init__(self):
        super().__post_init__()
        self._check_int("num_images", 0)
        self._check_int("context_tokens", 1)
        self._check_int("distractors", 0)
        for f in ("person_depth", "code_depth"):
            if getattr(self, f) is not None:
                self._check_fraction(f, getattr(self, f))
        self._check_fraction("min_separation", self.min_separation)
        if self.distractors + 1 > min(len(FACT_NAMES), len(TOWNS)):
            raise ValueError(f"MultiFact: distractors must be < {min(len(FACT_NAMES), len(TOWNS))}")

    def samples(self) -> list[Sample]:
        return [self._sample(i) for i in range(self.n_samples)]

    def _depths(self, rng: random.Random) -> tuple[float, float]:
        a, b = self.person_depth, self.code_depth
        for _ in range(1000):
            da = rng.random() if a is None else float(a)
            db = rng.random() if b is None else float(b)
            if a is not None and b is not None or abs(da - db) >= self.min_separation:
                return da, db
        return da, db

    def _sample(self, i: int) -> Sample:
        rng = random.Random(self.seed * 1_000_003 + i)
        k = self.distractors + 1
        names = rng.sample(FACT_NAMES, k)
        towns = rng.sample(TOWNS, k)
        codes: list[str] = []
        for _ in range(k):
            codes.append(random_code(rng, avoid=set(codes)))
        person_depth, code_depth = self._depths(rng)
        facts = [
            (person_depth, f"{names[0]} lives in {towns[0]}."),
            (code_depth, f"The postal code of {towns[0]} is {codes[0]}."),
        ]
        for j in range(1, k):
            facts.append((rng.random(), f"{names[j]} lives in {towns[j]}."))
            facts.append((rng.random(), f"The postal code of {towns[j]} is {codes[j]}."))
        sentences = filler_sentences(rng, self.context_tokens, exclude_towns=tuple(towns))
        sentences, positions = insert_at_depths(sentences, facts)
        question = f"What is the postal code of the town where {names[0]} lives? Answer with the code."
        content = interleave(INTRO, sentences, self.num_images, question, rng)
        return Sample(
            id=f"multi_fact-{self.seed}-{i}",
            content=content,
            answer=codes[0],
            meta={
                "name": names[0],
                "town": towns[0],
                "person_depth": person_depth,
                "code_depth": code_depth,
                "fact_sentences": positions[:2],
                "distractor_codes": codes[1:],
                "num_sentences": len(sentences),
                "approx_text_tokens": sum(approx_tokens(t) for t in content if isinstance(t, str)),
            },
        )

    def score(self, sample: Sample, prediction: str) -> float:
        if any(contains_number(prediction, c) for c in sample.meta.get("distractor_codes", [])):
            return 0.0
        return float(contains_number(prediction, sample.answer))
