"""Evaluation protocols: where the question sits relative to the compressed cache.

    question_aware      the question is part of the compressed prompt (the usual `generate` evaluation);
                        the first answer token is computed while the full cache is still there
    question_agnostic   the context ending before the question is compressed on its own, then each question
                        is asked on a copy of the compressed cache (kvpress's default; what chat and
                        "compress once, ask many" need)

`split_questions` turns one sample into (the context's inputs, each question's ids) for any model bundle:
it renders the sample with each of its questions and with two sentinel questions that share no first
character, and takes their common token prefix as the context. The remainder of each rendering is that
question's ids (chat-template closing tokens and the assistant prompt included), so context + question ids
are exactly the tokens of the question-aware prompt up to where the questions differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sample import Question, Sample

PROTOCOLS = ("question_aware", "question_agnostic")
# two questions whose renderings diverge at the first character of the question
_SENTINELS = ("# ?", "~ !")
# per-token inputs cut at the context's end with the ids (the others are per image or per prompt)
_TOKEN_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class SplitSample:
    """context: inputs of the context (batch 1); questions: ids [n] per question; asked: the questions."""

    context: dict
    questions: list[torch.Tensor]
    asked: list[Question]


def split_questions(bundle, sample: Sample) -> SplitSample:
    """The sample's context inputs and each question's ids (see the module doc)."""
    asked = sample.questions
    variants = [sample.asking(q) for q in asked] + [sample.asking(Question(s, "")) for s in _SENTINELS]
    rendered = [bundle.prepare([v]) for v in variants]
    rows = [r["input_ids"][0] for r in rendered]
    for r in rendered:
        mask = r.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError("split_questions: a single-row rendering came back padded")
    length = _common_prefix(rows)
    if length == 0:
        raise ValueError(f"sample {sample.id!r}: its renderings share no context tokens")
    base = rendered[-1]
    context = {k: (v[:, :length] if k in _TOKEN_INPUTS else v) for k, v in base.items()}
    questions = [row[length:] for row in rows[: len(asked)]]
    for q, row in zip(asked, questions):
        if row.numel() == 0:
            raise ValueError(f"sample {sample.id!r}: question {q.text!r} adds no tokens after the context")
    return SplitSample(context, questions, asked)


def _common_prefix(rows: list[torch.Tensor]) -> int:
    n = min(len(r) for r in rows)
    first = rows[0][:n]
    same = torch.ones(n, dtype=torch.bool, device=first.device)
    for r in rows[1:]:
        same &= r[:n] == first
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else n
