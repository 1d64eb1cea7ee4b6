"""Tiny random-weight models of every supported family, for tests and smoke runs.

A family is a module here registering its builder with @tiny_builder(name); TINY_FAMILIES (sorted) is read
from that registry on first use.
"""

from .tiny import Row, TinyModel, build_tiny, tiny_builder, tiny_families


def __getattr__(name: str):
    if name == "TINY_FAMILIES":
        return tiny_families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TINY_FAMILIES", "Row", "TinyModel", "build_tiny", "tiny_builder", "tiny_families"]
