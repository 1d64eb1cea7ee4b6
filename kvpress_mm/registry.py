"""Strategy registry: built-ins, presets, and third-party plugins (entry point group kvpress_mm.strategies)."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "kvpress_mm.strategies"


@dataclass(frozen=True)
class _Entry:
    cls: type
    defaults: dict = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, _Entry] = {}
_loaded = False


def register_strategy(name: str, **defaults):
    """Class decorator: make a strategy available as get_strategy(name).

    Extra keyword arguments register a preset: the same class with other default field values.
    """

    def decorator(cls):
        _add(name, cls, defaults)
        return cls

    return decorator


def register_preset(name: str, cls: type, description: str = "", **defaults) -> None:
    """Register `name` as `cls` with the given field defaults (e.g. the LOOK-M release's mode names)."""
    _add(name, cls, defaults, description)


def _add(name: str, cls: type, defaults: dict, description: str = "") -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"strategy name must be a non-empty string, got {name!r}")
    _check_fields(name, cls, defaults)
    existing = _REGISTRY.get(name)
    if existing is not None and (existing.cls is not cls or existing.defaults != defaults):
        raise ValueError(f"strategy name {name!r} is already registered to {existing.cls.__qualname__}")
    _REGISTRY[name] = _Entry(cls, dict(defaults), description)


def _check_fields(name: str, cls: type, fields: dict) -> None:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(
            f"strategy {name!r} has no field(s) {', '.join(unknown)}; its fields are: {', '.join(sorted(names))}"
        )


def _load() -> None:
    """Import the built-in strategies and the installed plugins once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import kvpress_mm.strategies as builtin

    for module in pkgutil.iter_modules(builtin.__path__):
        importlib.import_module(f"{builtin.__name__}.{module.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        # a plugin module may register itself on import; a class entry point is registered under ep.name
        if isinstance(obj, type) and ep.name not in _REGISTRY:
            _add(ep.name, obj, {})


def list_strategies() -> list[str]:
    """Names accepted by get_strategy, built-ins, presets and plugins."""
    _load()
    return sorted(_REGISTRY)


def strategy_class(name: str) -> tuple[type, dict]:
    """(class, preset defaults) registered under `name`."""
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; registered strategies: {', '.join(sorted(_REGISTRY))}")
    entry = _REGISTRY[name]
    return entry.cls, dict(entry.defaults)


def get_strategy(name: str, **fields):
    """Build the strategy registered as `name`, overriding its fields (e.g. budget=0.2)."""
    cls, defaults = strategy_class(name)
    _check_fields(name, cls, fields)
    return cls(**{**defaults, **fields})
