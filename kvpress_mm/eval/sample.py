"""One evaluation prompt: the user message (text and images interleaved) and its expected answer(s).

The last element of `content` is the question (a string); everything before it is the context. Under the
question-agnostic protocol the context is compressed on its own and each question is asked afterwards;
`more_questions` are further questions about the same context (several needles, several questions per
image set), so that one compressed cache serves several answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

Content = list[str | Image.Image]


@dataclass
class Question:
    """A question about a sample's context, its expected answer and task-specific details."""

    text: str
    answer: str
    meta: dict = field(default_factory=dict)


@dataclass
class Sample:
    """id: unique within a task's samples; content: the user message in order; answer: what scoring expects
    (may be "" for tasks scored against the full cache); meta: task-specific details (depths, names, ...)."""

    id: str
    content: Content
    answer: str
    meta: dict = field(default_factory=dict)
    more_questions: list[Question] = field(default_factory=list)

    @property
    def question(self) -> str:
        if not self.content or not isinstance(self.content[-1], str):
            raise ValueError(f"sample {self.id!r}: the last element of content must be the question (a string)")
        return self.content[-1]

    @property
    def context(self) -> Content:
        """The content before the question."""
        self.question  # noqa: B018 - the same check
        return self.content[:-1]

    @property
    def questions(self) -> list[Question]:
        """Every question about this context: the one in `content` first, then `more_questions`."""
        return [Question(self.question, self.answer, {}), *self.more_questions]

    def asking(self, question: Question, index: int | None = None) -> Sample:
        """The same context with `question` at the end (a single-question sample; its id gets /q<index>)."""
        sid = self.id if not index else f"{self.id}/q{index}"
        return Sample(sid, [*self.context, question.text], question.answer, {**self.meta, **question.meta})

    @property
    def texts(self) -> list[str]:
        return [c for c in self.content if isinstance(c, str)]

    @property
    def images(self) -> list[Image.Image]:
        return [c for c in self.content if isinstance(c, Image.Image)]

    @property
    def num_images(self) -> int:
        return len(self.images)
