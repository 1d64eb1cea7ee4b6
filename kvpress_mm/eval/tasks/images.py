"""Deterministic synthetic images (coloured shapes on a gradient) for the tasks: Pillow only, no downloads."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

IMAGE_SIZE = 224
_PALETTE = (
    (220, 30, 30),
    (30, 170, 60),
    (40, 60, 220),
    (240, 210, 30),
    (140, 50, 170),
    (245, 140, 20),
    (245, 245, 245),
    (15, 15, 15),
    (0, 160, 170),
    (200, 90, 140),
)


def synthetic_image(rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """A size x size RGB scene: a two-colour vertical gradient with 2-5 filled shapes."""
    top = tuple(rng.randrange(40, 215) for _ in range(3))
    bottom = tuple(rng.randrange(40, 215) for _ in range(3))
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        a = y / max(1, size - 1)
        draw.line([(0, y), (size, y)], fill=tuple(round(t * (1 - a) + b * a) for t, b in zip(top, bottom)))
    for _ in range(rng.randrange(2, 6)):
        s = rng.randrange(size // 8, size // 2)
        x0, y0 = rng.randrange(0, size - s), rng.randrange(0, size - s)
        box = (x0, y0, x0 + s, y0 + s)
        color = rng.choice(_PALETTE)
        shape = rng.randrange(3)
        if shape == 0:
            draw.ellipse(box, fill=color)
        elif shape == 1:
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(x0 + s // 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=color)
    return img
