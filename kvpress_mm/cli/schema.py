"""Hydra schemas derived from dataclasses: a strategy's (or task's) fields become a typed config node.

The fields are read from the class itself (never written a second time), so a new field, a preset or a
plugin strategy gets a typed config for free. OmegaConf checks types at composition time
(`strategy.window_size=abc` fails there); value ranges are checked by the class's own __post_init__.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf


def init_fields(cls: type) -> list[dataclasses.Field]:
    """The dataclass fields a user can set (those accepted by __init__), in declaration order."""
    if not dataclasses.is_dataclass(cls):
        return []
    return [f for f in dataclasses.fields(cls) if f.init]


def field_defaults(cls: type, overrides: dict | None = None) -> dict[str, Any]:
    """{field: default} of `cls`, with `overrides` (e.g. a preset's defaults) on top; MISSING stays MISSING."""
    out = {}
    for f in init_fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = "???"  # OmegaConf's "mandatory" marker: the user must give a value
    out.update(overrides or {})
    return out


def schema_dataclass(
    schema_name: str, cls: type, leading: list[tuple[str, type, Any]], defaults: dict[str, Any]
) -> type:
    """A plain dataclass for ConfigStore: `leading` fields (e.g. `name`), then `cls`'s fields with `defaults`."""
    hints = _type_hints(cls)
    spec = [(name, typ, _as_field(default)) for name, typ, default in leading]
    for f in init_fields(cls):
        spec.append((f.name, _omegaconf_type(hints.get(f.name, Any)), _as_field(defaults[f.name])))
    return dataclasses.make_dataclass(schema_name, spec)


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: leave that field untyped
        return {}


def _as_field(default: Any) -> Any:
    if isinstance(default, (dict, list, set)):
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d))
    return dataclasses.field(default=default)


def _omegaconf_type(annotation: Any) -> Any:
    """`annotation` if OmegaConf can enforce it, Optional[...] for `X | None`, else Any (unchecked)."""
    if annotation is Any:
        return Any
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            inner = _omegaconf_type(args[0])
            return Optional[inner] if inner is not Any else Any
        return Any  # OmegaConf 2.3 has no general unions
    try:
        OmegaConf.structured(dataclasses.make_dataclass("_Probe", [("x", Optional[annotation], None)]))
    except Exception:
        return Any
    return annotation


def schema_node(schema: type, overrides: dict | None = None) -> DictConfig:
    """The ConfigStore node of `schema`: typed, closed to unknown keys, except its dict fields.

    A dict field (e.g. adakv's inner_fields) holds keys of its own choosing, so it stays open:
    `strategy.inner_fields={recent_share: 0.3}` must not fail as "key not in struct".
    """
    node = OmegaConf.structured(schema)
    if overrides:
        node = OmegaConf.merge(node, overrides)
    for key in node:
        if isinstance(node._get_node(key), DictConfig):
            OmegaConf.set_struct(node[key], False)
    return node
