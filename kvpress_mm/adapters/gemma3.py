"""Gemma3: interleaved sliding-window and global layers; only the global layers are compressed."""

from . import register_adapter
from .base import ModelAdapter

register_adapter(ModelAdapter(family="gemma3", model_types=("gemma3",), decoder_path="model.language_model"))
