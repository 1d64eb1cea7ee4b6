"""LLaVA-1.5: <image> placeholders expanded to the vision tower's patch features."""

from . import register_adapter
from .base import ModelAdapter

register_adapter(ModelAdapter(family="llava", model_types=("llava",), decoder_path="model.language_model"))
