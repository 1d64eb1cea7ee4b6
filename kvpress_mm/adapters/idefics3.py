"""Idefics3 and SmolVLM: the text decoder is `text_model`; images arrive as tiled <image> runs."""

from . import register_adapter
from .base import ModelAdapter

register_adapter(ModelAdapter(family="idefics3", model_types=("idefics3", "smolvlm"), decoder_path="model.text_model"))
