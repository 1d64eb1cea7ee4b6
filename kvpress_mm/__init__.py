"""kvpress-mm: KV-cache eviction and merging for multimodal LLMs in transformers.

strategy = kvpress_mm.get_strategy("snapkv", budget=0.2)
with strategy(model) as press:
    out = model.generate(**inputs, max_new_tokens=32)
print(press.report.summary())
"""

from .adapters import supported_families
from .layer import AttentionNeeds, LayerKV, Plan
from .modality import Modality
from .registry import get_strategy, list_strategies, register_preset, register_strategy
from .report import CacheSize, CompressionReport, cache_size
from .strategy import EvictionStrategy

__version__ = "0.1.0"


def __getattr__(name):
    # the session imports transformers (seconds); load it on first use so `kvpress-mm --help` stays fast
    if name == "CompressionSession":
        from .session import CompressionSession

        return CompressionSession
    if name in ("compress_context", "CompressedContext", "Answer"):
        from . import context

        return getattr(context, name)
    if name in ("CompressedCache", "CompressedLayer", "fork"):
        from . import compressed_cache

        return getattr(compressed_cache, name)
    raise AttributeError(f"module 'kvpress_mm' has no attribute {name!r}")


__all__ = [
    "Answer",
    "AttentionNeeds",
    "CacheSize",
    "CompressionReport",
    "CompressedCache",
    "CompressedContext",
    "CompressedLayer",
    "CompressionSession",
    "EvictionStrategy",
    "LayerKV",
    "Modality",
    "Plan",
    "cache_size",
    "compress_context",
    "fork",
    "get_strategy",
    "list_strategies",
    "register_preset",
    "register_strategy",
    "supported_families",
]
