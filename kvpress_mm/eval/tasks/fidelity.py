"""fidelity: how closely a strategy follows the full cache, for any model (also random-weight tiny ones).

The runner first lets the full cache generate greedily (max_new_tokens tokens), then feeds that same
continuation to the compressed model through `generate` (a logits processor forces the full cache's tokens,
so positions, masks and the compressed cache are handled by generate itself) and compares the raw logits
step by step. Per sample: `kl` = mean over steps of KL(full || compressed) of the next-token distributions,
`agreement` = fraction of steps whose argmax tokens agree, `prefix_agreement` = fraction of steps before the
first disagreement (what free greedy decoding would have reproduced). The task score is `agreement`.
A sample's `prediction` is the strategy's own greedy output up to and including its first token that differs
from the full cache (exact: until then, teacher forcing and free decoding see the same tokens).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..sample import Sample
from . import register_task
from .base import Task
from .filler import approx_tokens, filler_sentences
from .layout import interleave

INTRO = "Here is a short document with text and images."
QUESTIONS = (
    "Summarise the document in a few sentences.",
    "Which people are mentioned in the document, and what did they do?",
    "Describe the towns and places mentioned above.",
    "Write a short story that continues the document.",
)


@register_task("fidelity")
@dataclass
class Fidelity(Task):
    n_samples: int = 8
    seed: int = 0
    num_images: int = 2
    context_tokens: int = 256
    max_new_tokens: int = 16

    mode = "fidelity"

    def __post_init__(self):
        super().__post_init__()
        self._check_int("num_images", 0)
        self._check_int("context_tokens", 1)

    def samples(self) -> list[Sample]:
        out = []
        for i in range(self.n_samples):
            rng = random.Random(self.seed * 1_000_003 + i)
            sentences = filler_sentences(rng, self.context_tokens)
            content = interleave(INTRO, sentences, self.num_images, rng.choice(QUESTIONS), rng)
            out.append(
                Sample(
                    id=f"fidelity-{self.seed}-{i}",
                    content=content,
                    answer="",
                    meta={"approx_text_tokens": sum(approx_tokens(t) for t in content if isinstance(t, str))},
                )
            )
        return out

    def score(self, sample: Sample, prediction: str) -> float:
        raise NotImplementedError(
            "fidelity is scored by the runner (evaluate) against the full cache's teacher-forced logits, "
            "not from a decoded answer"
        )
