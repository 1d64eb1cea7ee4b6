"""Model bundles: `load_model(name, **options)`, `list_models()`.

    mini_llava        the offline real model (options: dtype, device, projector_path, cache_dir, attn_implementation)
    tiny_<family>     random-weight test models, one per kvpress_mm.testing.TINY_FAMILIES (dtype, device, seed)
    hub               any transformers VLM / LM (model_id, dtype, device_map, device, attn_implementation, ...)
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from kvpress_mm.testing import TINY_FAMILIES

from .bundle import ModelBundle, resolve_dtype
from .hub import load_hub_bundle
from .mini_llava import load_mini_llava_bundle
from .tiny import load_tiny_bundle

_LOADERS: dict[str, Callable[..., ModelBundle]] = {"mini_llava": load_mini_llava_bundle, "hub": load_hub_bundle}
for _family in TINY_FAMILIES:
    _LOADERS[f"tiny_{_family}"] = functools.partial(load_tiny_bundle, _family)


def list_models() -> list[str]:
    return sorted(_LOADERS)


def model_options(name: str) -> list[str]:
    """The keyword options load_model(name, ...) accepts."""
    loader = _loader(name)
    params = inspect.signature(loader).parameters
    return [p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]


def _loader(name: str) -> Callable[..., ModelBundle]:
    if name not in _LOADERS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    return _LOADERS[name]


def load_model(name: str, **options) -> ModelBundle:
    """Load the model bundle `name` (see list_models()); unknown options raise a ValueError listing the valid ones."""
    loader = _loader(name)
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r} has no option(s) {', '.join(unknown)}; its options are: {', '.join(allowed)}")
    return loader(**options)


__all__ = ["ModelBundle", "list_models", "load_model", "model_options", "resolve_dtype"]
