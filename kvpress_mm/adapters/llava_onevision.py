"""LLaVA-OneVision: images and videos, each with its own placeholder id."""

from . import register_adapter
from .base import ModelAdapter

register_adapter(
    ModelAdapter(
        family="llava_onevision",
        model_types=("llava_onevision",),
        decoder_path="model.language_model",
        video_token_attr="video_token_id",
    )
)
