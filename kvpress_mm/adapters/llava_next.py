"""LLaVA-NeXT: any-resolution tiles; the processor expands <image> to every tile's features."""

from . import register_adapter
from .base import ModelAdapter

register_adapter(ModelAdapter(family="llava_next", model_types=("llava_next",), decoder_path="model.language_model"))
