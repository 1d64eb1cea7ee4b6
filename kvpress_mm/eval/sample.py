"""One evaluation prompt: the user message (text and images interleaved) and its expected answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from PIL import Image

Content = list[Union[str, Image.Image]]


@dataclass
class Sample:
    """id: unique within a task's samples; content: the user message in order; answer: what scoring expects
    (may be "" for tasks scored against the full cache); meta: task-specific details (depths, names, ...)."""

    id: str
    content: Content
    answer: str
    meta: dict = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [c for c in self.content if isinstance(c, str)]

    @property
    def images(self) -> list[Image.Image]:
        return [c for c in self.content if isinstance(c, Image.Image)]

    @property
    def num_images(self) -> int:
        return len(self.images)
