"""Model adapters, one small file per family, looked up by config.model_type.

Every module of this package is imported on first use (a module registers its adapter(s) on import), so a new
family is a new file here calling register_adapter(ModelAdapter(...)).
"""

from __future__ import annotations

import torch

from ..registry_base import Registry
from .base import ModelAdapter

# config.model_type -> adapter
ADAPTERS: Registry[ModelAdapter] = Registry(
    "model type",
    listing="supported model types",
    builtins="kvpress_mm.adapters",
    describe=lambda adapter: f"the {adapter.family} adapter",
)
_ADAPTERS = ADAPTERS.entries  # the same dict, for old callers


def register_adapter(adapter: ModelAdapter, replace: bool = False) -> ModelAdapter:
    """Register `adapter` for each of its model_types; a model type another adapter has is a ValueError
    unless `replace` (e.g. to override a built-in adapter)."""
    ADAPTERS.load()  # the built-ins first, so that a replacement is not itself replaced later
    for model_type in adapter.model_types:
        ADAPTERS.register(model_type, adapter, replace=replace)
    return adapter


def supported_families() -> list[str]:
    return sorted({a.family for _, a in ADAPTERS.items()})


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    """The adapter of `model`'s family, or a ValueError naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.find(model_type) if isinstance(model_type, str) else None
    if adapter is None:
        raise ValueError(
            f"model family {model_type!r} ({type(model).__name__}) is not supported by kvpress-mm; "
            f"supported families: {', '.join(supported_families())}"
        )
    return adapter


__all__ = ["ModelAdapter", "adapter_for", "register_adapter", "supported_families"]
