"""Tiny random-weight models of every supported family, for tests and smoke runs."""

from .tiny import TINY_FAMILIES, Row, TinyModel, build_tiny

__all__ = ["TINY_FAMILIES", "Row", "TinyModel", "build_tiny"]
