"""Qwen2-VL and Qwen2.5-VL: M-RoPE positions; the inputs carry mm_token_type_ids (0 text, 1 image, 2 video)."""

from . import register_adapter
from .base import ModelAdapter

register_adapter(
    ModelAdapter(
        family="qwen2_vl",
        model_types=("qwen2_vl", "qwen2_5_vl"),
        decoder_path="model.language_model",
        video_token_attr="video_token_id",
        type_ids_input="mm_token_type_ids",
    )
)
