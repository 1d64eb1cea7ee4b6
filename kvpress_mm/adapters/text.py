"""Plain text causal LMs (Llama, Qwen2): every position is text."""

from . import register_adapter
from .base import ModelAdapter

register_adapter(ModelAdapter(family="llama", model_types=("llama",), decoder_path="model", image_token_attr=None))
register_adapter(ModelAdapter(family="qwen2", model_types=("qwen2",), decoder_path="model", image_token_attr=None))
