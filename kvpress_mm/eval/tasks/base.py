"""The Task base class: a dataclass whose fields are its whole configuration."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import ClassVar

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
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{type(self).__name__}: {field} must be an integer >= {low}, got {value!r}")

    def _check_fraction(self, field: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{type(self).__name__}: {field} must be a number in [0, 1], got {value!r}")

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
