"""The Task base class: a dataclass whose fields are its whole configuration."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import ClassVar

from ...validate import check_choice, check_fraction, check_int
from ..sample import Sample

# how the runner evaluates a task: "generate" (free greedy generation scored by `score`) or
# "fidelity" (teacher-forced against the full cache's own greedy continuation; `score` is not used)
MODES = ("generate", "fidelity")


@dataclass
class Task:
    """n_samples prompts generated deterministically from `seed`; answers of up to max_new_tokens tokens."""

    n_samples: int = 20
    seed: int = 0
    max_new_tokens: int = 16

    name: ClassVar[str] = ""
    mode: ClassVar[str] = "generate"

    def __post_init__(self):
        self._check_int("n_samples", 1)
        self._check_int("seed", 0)
        self._check_int("max_new_tokens", 1)

    def _check_int(self, field: str, low: int) -> None:
        check_int(type(self).__name__, field, getattr(self, field), minimum=low)

    def _check_fraction(self, field: str, value) -> None:
        check_fraction(type(self).__name__, field, value)

    def _check_choice(self, field: str, choices) -> None:
        check_choice(type(self).__name__, field, getattr(self, field), choices)

    def samples(self) -> list[Sample]:
        """The task's prompts, the same list for the same fields."""
        raise NotImplementedError

    def score(self, sample: Sample, prediction: str) -> float:
        """Score in [0, 1] of the model's decoded answer to `sample`."""
        raise NotImplementedError

    def config(self) -> dict:
        """The fields, JSON-serialisable."""
        return dataclasses.asdict(self)


def contains_number(prediction: str, number: str) -> bool:
    """Whether `number` appears in `prediction` as a whole number (not inside a longer digit run)."""
    return re.search(rf"(?<!\d){re.escape(number)}(?!\d)", prediction) is not None
