"""Model bundles: `load_model(name, **options)`, `list_models()`.

mini_llava        the offline real model (options: dtype, device, projector_path, cache_dir, attn_implementation)
tiny_<family>     random-weight test models, one per kvpress_mm.testing.TINY_FAMILIES (dtype, device, seed)
hub               any transformers VLM / LM (model_id, dtype, device_map, device, attn_implementation, ...)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from ...registry_base import Registry
from .bundle import ModelBundle, resolve_dtype
from .hub import load_hub_bundle
from .mini_llava import load_mini_llava_bundle
from .tiny import load_tiny_bundle


def _builtin_loaders() -> None:
    from kvpress_mm.testing import tiny_families

    MODELS.register("mini_llava", load_mini_llava_bundle)
    MODELS.register("hub", load_hub_bundle)
    for family in tiny_families():  # one per tiny builder, found when first asked for
        MODELS.register(f"tiny_{family}", functools.partial(load_tiny_bundle, family))


MODELS: Registry[Callable[..., ModelBundle]] = Registry(
    "model",
    listing="available models",
    loader=_builtin_loaders,
    # functools.partial has no __eq__: the same tiny family's loader again is the same registration
    same=lambda old, new: (
        old is new
        or (
            isinstance(old, functools.partial)
            and isinstance(new, functools.partial)
            and (old.func, old.args, old.keywords) == (new.func, new.args, new.keywords)
        )
    ),
)
_LOADERS = MODELS.entries  # the same dict, for old callers


def list_models() -> list[str]:
    return MODELS.names()


def model_options(name: str) -> list[str]:
    """The keyword options load_model(name, ...) accepts."""
    loader = _loader(name)
    params = inspect.signature(loader).parameters
    return [p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]


def _loader(name: str) -> Callable[..., ModelBundle]:
    return MODELS.get(name)  # ValueError: unknown model 'x'; available models: ...


def load_model(name: str, **options) -> ModelBundle:
    """Load the model bundle `name` (see list_models()); unknown options raise a ValueError listing the valid ones."""
    loader = _loader(name)
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r} has no option(s) {', '.join(unknown)}; its options are: {', '.join(allowed)}")
    return loader(**options)


__all__ = ["ModelBundle", "list_models", "load_model", "model_options", "resolve_dtype"]
