"""Strategy registry: built-ins, presets, and third-party plugins (entry point group kvpress_mm.strategies).

The built-ins are every module of kvpress_mm.strategies (the strategies/ folder), imported with the plugins on
the first lookup (kvpress_mm.registry_base.Registry: thread-safe; a plugin that fails to load is skipped with a
PluginLoadWarning).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .registry_base import Registry

ENTRY_POINT_GROUP = "kvpress_mm.strategies"


@dataclass(frozen=True)
class _Entry:
    cls: type
    defaults: dict = field(default_factory=dict)
    description: str = ""


def _on_entry_point(name: str, obj: object) -> None:
    # a plugin module may register itself on import; a class entry point is registered under its name
    if isinstance(obj, type) and name not in STRATEGIES.entries:
        _add(name, obj, {})


# the built-in strategies (every module of kvpress_mm.strategies) and the installed plugins, loaded on first use
STRATEGIES: Registry[_Entry] = Registry(
    "strategy",
    listing="registered strategies",
    builtins="kvpress_mm.strategies",
    entry_point_group=ENTRY_POINT_GROUP,
    on_entry_point=_on_entry_point,
    same=lambda old, new: old.cls is new.cls and old.defaults == new.defaults,
    describe=lambda entry: entry.cls.__qualname__,
)
_REGISTRY = STRATEGIES.entries  # the same dict, for old callers
_load = STRATEGIES.load


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
    STRATEGIES.register(name, _Entry(cls, dict(defaults), description))


def _check_fields(name: str, cls: type, fields: dict) -> None:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(
            f"strategy {name!r} has no field(s) {', '.join(unknown)}; its fields are: {', '.join(sorted(names))}"
        )


def list_strategies() -> list[str]:
    """Names accepted by get_strategy, built-ins, presets and plugins."""
    return STRATEGIES.names()


def strategy_class(name: str) -> tuple[type, dict]:
    """(class, preset defaults) registered under `name`."""
    entry = STRATEGIES.get(name)  # ValueError: unknown strategy 'x'; registered strategies: ...
    return entry.cls, dict(entry.defaults)


def get_strategy(name: str, **fields):
    """Build the strategy registered as `name`, overriding its fields (e.g. budget=0.2)."""
    cls, defaults = strategy_class(name)
    _check_fields(name, cls, fields)
    return cls(**{**defaults, **fields})
