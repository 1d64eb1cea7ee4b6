"""Task registry: `get_task(name, **fields)`, `list_tasks()`, `@register_task(name)`."""

from __future__ import annotations

import dataclasses

from .base import MODES, Task, contains_number

_TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
    """Class decorator: make a Task dataclass available as get_task(name)."""

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, Task) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"register_task({name!r}) expects a Task dataclass, got {cls!r}")
        if cls.mode not in MODES:
            raise ValueError(f"task {name!r}: mode must be one of {MODES}, got {cls.mode!r}")
        existing = _TASKS.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"task name {name!r} is already registered to {existing.__qualname__}")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorator


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def task_fields(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_task_class(name))]


def _task_class(name: str) -> type[Task]:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(list_tasks())}")
    return _TASKS[name]


def get_task(name: str, **fields) -> Task:
    """Build task `name`, overriding its fields (e.g. n_samples=5)."""
    cls = _task_class(name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"task {name!r} has no field(s) {', '.join(unknown)}; its fields are: {', '.join(known)}")
    return cls(**fields)


# the built-in tasks register themselves on import
from . import fidelity, image_counting, image_in_text, image_lookup, image_needle, multi_fact, text_needle  # noqa: E402,F401

__all__ = ["Task", "contains_number", "get_task", "list_tasks", "register_task", "task_fields"]
