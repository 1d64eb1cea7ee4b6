"""InternVL: <IMG_CONTEXT> placeholders between <img> and </img> markers."""

from . import register_adapter
from .base import ModelAdapter

register_adapter(ModelAdapter(family="internvl", model_types=("internvl",), decoder_path="model.language_model"))
