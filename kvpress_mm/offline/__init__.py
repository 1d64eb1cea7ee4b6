"""Real models that install offline from PyPI wheels (no hub): see `mini_llava`."""

from .images import IMAGE_SIZE, preprocess_images, sample_image, synthetic_image, synthetic_scene
from .mini_llava import (
    IMAGE_TOKEN,
    TOKENS_PER_IMAGE,
    MiniLlavaProcessor,
    build_mini_llava,
    is_current,
    load_mini_llava,
    load_projector,
    read_metadata,
    save_projector,
)
from .paths import cache_root, mini_llava_dir

__all__ = [
    "IMAGE_SIZE",
    "IMAGE_TOKEN",
    "TOKENS_PER_IMAGE",
    "MiniLlavaProcessor",
    "build_mini_llava",
    "cache_root",
    "is_current",
    "load_mini_llava",
    "load_projector",
    "mini_llava_dir",
    "preprocess_images",
    "read_metadata",
    "sample_image",
    "save_projector",
    "synthetic_image",
    "synthetic_scene",
]
