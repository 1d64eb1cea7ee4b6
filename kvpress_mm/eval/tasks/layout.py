"""Interleaving a document's sentences with images into one user message (MileBench-style)."""

from __future__ import annotations

import random

from PIL import Image

from .filler import split_even
from .images import synthetic_image


def insert_at_depths(sentences: list[str], facts: list[tuple[float, str]]) -> tuple[list[str], list[int]]:
    """Insert each (depth in [0, 1], sentence) so that it sits at that relative depth of the document.

    Returns the new sentence list and the index each fact ended up at (in the order given).
    """
    out = list(sentences)
    n = len(sentences)
    order = sorted(range(len(facts)), key=lambda i: (facts[i][0], i))
    # insert from the deepest, so that earlier insertions do not shift later targets
    slots = {i: round(facts[i][0] * n) for i in order}
    for i in sorted(order, key=lambda i: (-slots[i], -i)):
        out.insert(slots[i], facts[i][1])
    positions = {}
    taken = set()
    for i in order:
        idx = next(k for k, s in enumerate(out) if s == facts[i][1] and k not in taken)
        taken.add(idx)
        positions[i] = idx
    return out, [positions[i] for i in range(len(facts))]


def interleave(
    intro: str, sentences: list[str], num_images: int, question: str, rng: random.Random
) -> list[str | Image.Image]:
    """[intro + text_0, image_1, text_1, ..., image_k, text_k, question]: the images split the document into
    k + 1 parts of about equal sentence counts. Empty text parts are dropped."""
    images = [synthetic_image(rng) for _ in range(num_images)]
    parts = split_even(sentences, num_images + 1)
    content: list[str | Image.Image] = []
    for k, part in enumerate(parts):
        text = " ".join(part)
        if k == 0:
            text = f"{intro}\n\n{text}" if text else intro
        if text:
            content.append(text)
        if k < num_images:
            content.append(images[k])
    content.append(question)
    return content
