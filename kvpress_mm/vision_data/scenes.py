"""Synthetic scenes drawn with Pillow: coloured shapes, digits and short words at random places.

Everything is deterministic from a seed (Python's `random.Random`, Pillow's bundled default TrueType
font), so the same seed gives the same image on every machine with the same Pillow major version.

    scene = make_scene(seed=3, kind="single_shape")
    scene.image          # 224 x 224 RGB PIL image
    scene.objects        # [SceneObject(kind="shape", color="red", shape="circle", box=(x0, y0, x1, y1)), ...]

Scene kinds (KINDS):
  single_shape  one shape (circle / square / triangle / star) of one colour
  single_digit  one digit 0-9 in one colour
  single_word   one short word (WORDS) in one colour
  multi         2-4 objects (mostly shapes, sometimes a digit), distinct (colour, shape) pairs
  shapes        1-4 shapes only (no text), distinct (colour, shape) pairs: used for haystack images
The background is a uniform grey-ish tint that is never one of the palette colours.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 224

# the palette: names the model has to say, RGB values far apart from each other and from the background
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 225),
    "yellow": (245, 215, 30),
    "orange": (245, 135, 20),
    "purple": (140, 45, 175),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star")
DIGITS = tuple("0123456789")
WORDS = ("cat", "dog", "sun", "car", "hat", "box", "fish", "tree", "book", "moon", "bird", "cup")
KINDS = ("single_shape", "single_digit", "single_word", "multi", "shapes")

# size names by the object's longest side in pixels (224 px image)
SIZE_NAMES = ((70, "small"), (120, "medium"), (10_000, "large"))


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled TrueType font (Aileron Regular) at `size` px; the bitmap default without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow built without FreeType
        return ImageFont.load_default()


@dataclass
class SceneObject:
    """kind: "shape" | "digit" | "word"; shape: the shape name for shapes; text: the digit / word."""

    kind: str
    color: str
    box: tuple[int, int, int, int]
    shape: str | None = None
    text: str | None = None

    @property
    def name(self) -> str:
        """What the object is called in captions: "circle", "digit 7", "word cat"."""
        if self.kind == "shape":
            return self.shape
        return f"{self.kind} {self.text}"

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def size_name(self) -> str:
        x0, y0, x1, y1 = self.box
        side = max(x1 - x0, y1 - y0)
        return next(name for limit, name in SIZE_NAMES if side < limit)

    def horizontal(self, image_size: int = IMAGE_SIZE) -> str | None:
        """ "left" / "right" when the centre is clearly on one side (outer 40 %), "center" in the middle
        fifth, None when ambiguous."""
        return _side(self.center[0] / image_size, "left", "right")

    def vertical(self, image_size: int = IMAGE_SIZE) -> str | None:
        """ "top" / "bottom" / "center" / None, as `horizontal`."""
        return _side(self.center[1] / image_size, "top", "bottom")


def _side(t: float, low: str, high: str) -> str | None:
    if t < 0.4:
        return low
    if t > 0.6:
        return high
    if 0.45 <= t <= 0.55:
        return "center"
    return None


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    kind: str
    seed: int
    background: tuple[int, int, int] = (128, 128, 128)
    meta: dict = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[SceneObject]:
        return [o for o in self.objects if o.kind == kind]


# ----------------------------------------------------------------------------- drawing


def _star(box: tuple[int, int, int, int], points: int = 5) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    out = []
    for k in range(2 * points):
        rad = r if k % 2 == 0 else r * 0.42
        a = -math.pi / 2 + k * math.pi / points
        out.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return out


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(box), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def text_box(text: str, size: int) -> tuple[int, int, int, int]:
    """The ink box of `text` drawn at (0, 0) with the font at `size` px."""
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font(size))


def _background(rng: random.Random) -> tuple[int, int, int]:
    g = rng.randrange(105, 175)
    return tuple(max(0, min(255, g + rng.randrange(-12, 13))) for _ in range(3))


def _place(
    rng: random.Random,
    w: int,
    h: int,
    taken: list[tuple[int, int, int, int]],
    size: int,
    margin: int = 6,
    tries: int = 200,
) -> tuple[int, int] | None:
    """Top-left corner for a w x h box inside the image, not overlapping `taken` (with a margin)."""
    for _ in range(tries):
        x = rng.randrange(margin, max(margin + 1, size - w - margin))
        y = rng.randrange(margin, max(margin + 1, size - h - margin))
        if all(
            x + w + margin <= a or c + margin <= x or y + h + margin <= b or d + margin <= y for a, b, c, d in taken
        ):
            return x, y
    return None


def _add_shape(draw, rng, objects, taken, size, color, shape, side) -> bool:
    pos = _place(rng, side, side, taken, size)
    if pos is None:
        return False
    box = (pos[0], pos[1], pos[0] + side, pos[1] + side)
    draw_shape(draw, shape, box, COLORS[color])
    objects.append(SceneObject("shape", color, box, shape=shape))
    taken.append(box)
    return True


def _add_text(draw, rng, objects, taken, size, color, kind, text, font_size) -> bool:
    bx0, by0, bx1, by1 = text_box(text, font_size)
    w, h = bx1 - bx0, by1 - by0
    pos = _place(rng, w, h, taken, size)
    if pos is None:
        return False
    draw.text((pos[0] - bx0, pos[1] - by0), text, font=font(font_size), fill=COLORS[color])
    box = (pos[0], pos[1], pos[0] + w, pos[1] + h)
    objects.append(SceneObject(kind, color, box, text=text))
    taken.append(box)
    return True


def _text_color(rng: random.Random, colors: tuple[str, ...]) -> str:
    return rng.choice(colors)


# ----------------------------------------------------------------------------- scenes


def make_scene(
    seed: int,
    kind: str | None = None,
    size: int = IMAGE_SIZE,
    colors: tuple[str, ...] | None = None,
    shapes: tuple[str, ...] | None = None,
    n_objects: int | None = None,
    digit: str | None = None,
    word: str | None = None,
    color: str | None = None,
    shape: str | None = None,
) -> Scene:
    """A deterministic scene from `seed`. kind: one of KINDS (None: drawn from the seed).

    colors / shapes restrict the palette; n_objects (multi / shapes kinds) fixes the object count;
    digit / word / color / shape force the content of single-object scenes (and of the first object of
    multi / shapes scenes).
    """
    rng = random.Random(f"scene:{seed}")
    kind = (
        kind
        if kind is not None
        else rng.choice(("single_shape", "single_shape", "single_digit", "single_digit", "multi", "single_word"))
    )
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; known: {KINDS}")
    colors = tuple(colors or COLORS)
    shapes = tuple(shapes or SHAPES)
    bg = _background(rng)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    objects: list[SceneObject] = []
    taken: list[tuple[int, int, int, int]] = []
    scale = size / IMAGE_SIZE

    if kind == "single_shape":
        side = int(rng.randrange(45, 150) * scale)
        _add_shape(draw, rng, objects, taken, size, color or rng.choice(colors), shape or rng.choice(shapes), side)
    elif kind == "single_digit":
        fs = int(rng.randrange(70, 150) * scale)
        _add_text(
            draw, rng, objects, taken, size, color or _text_color(rng, colors), "digit", digit or rng.choice(DIGITS), fs
        )
    elif kind == "single_word":
        fs = int(rng.randrange(40, 64) * scale)
        _add_text(
            draw, rng, objects, taken, size, color or _text_color(rng, colors), "word", word or rng.choice(WORDS), fs
        )
    else:  # multi / shapes
        n = n_objects if n_objects is not None else rng.randrange(2, 5) if kind == "multi" else rng.randrange(1, 5)
        used: set[tuple[str, str]] = set()
        with_digit = kind == "multi" and (digit is not None or rng.random() < 0.3)
        for k in range(n):
            if with_digit and k == n - 1:
                fs = int(rng.randrange(50, 90) * scale)
                _add_text(draw, rng, objects, taken, size, rng.choice(colors), "digit", digit or rng.choice(DIGITS), fs)
                continue
            for _ in range(50):
                c = color if (k == 0 and color) else rng.choice(colors)
                s = shape if (k == 0 and shape) else rng.choice(shapes)
                if (c, s) not in used:
                    break
            used.add((c, s))
            side = int(rng.randrange(36, 90 if n > 2 else 110) * scale)
            _add_shape(draw, rng, objects, taken, size, c, s, side)
    return Scene(image=img, objects=objects, kind=kind, seed=seed, background=bg)


def scene_stream(seed: int, n: int, kinds: dict[str, float] | None = None, **options) -> list[Scene]:
    """n scenes; scene i uses seed (seed, i) and a kind drawn from `kinds` ({kind: weight}; None = default mix)."""
    kinds = kinds or {"single_shape": 0.35, "single_digit": 0.3, "multi": 0.25, "single_word": 0.1}
    names, weights = zip(*kinds.items())
    rng = random.Random(f"stream:{seed}")
    out = []
    for i in range(n):
        kind = rng.choices(names, weights)[0]
        out.append(make_scene(scene_seed(seed, i), kind, **options))
    return out


def scene_seed(seed: int, index: int) -> int:
    """A per-scene seed: disjoint streams for different `seed`s (up to 10 million scenes each)."""
    return seed * 10_000_000 + index
