"""Model adapters, one small file per family, looked up by config.model_type."""

from __future__ import annotations

import torch

from .base import ModelAdapter

_ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


def supported_families() -> list[str]:
    _load_builtin()
    return sorted({a.family for a in _ADAPTERS.values()})


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    """The adapter of `model`'s family, or a ValueError naming the supported families."""
    _load_builtin()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"model family {model_type!r} ({type(model).__name__}) is not supported by kvpress-mm; "
            f"supported families: {', '.join(supported_families())}"
        )
    return _ADAPTERS[model_type]


def _load_builtin() -> None:
    from . import gemma3, idefics3, internvl, llava, llava_next, llava_onevision, qwen_vl, text  # noqa: F401


__all__ = ["ModelAdapter", "adapter_for", "register_adapter", "supported_families"]
