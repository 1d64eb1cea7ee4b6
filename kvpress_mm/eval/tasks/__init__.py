"""Task registry: `get_task(name, **fields)`, `list_tasks()`, `@register_task(name)`.

The built-in tasks are the @register_task classes of this package's modules, all imported on first use.
"""

from __future__ import annotations

import dataclasses

from ...registry_base import Registry
from .base import MODES, Task, contains_number

TASKS: Registry[type[Task]] = Registry(
    "task",
    listing="available tasks",
    builtins="kvpress_mm.eval.tasks",
    # a re-imported module (same qualified name) replaces its class
    same=lambda old, new: old is new or old.__qualname__ == new.__qualname__,
)
_TASKS = TASKS.entries  # the same dict, for old callers


def register_task(name: str):
    """Class decorator: make a Task dataclass available as get_task(name)."""

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, Task) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"register_task({name!r}) expects a Task dataclass, got {cls!r}")
        if cls.mode not in MODES:
            raise ValueError(f"task {name!r}: mode must be one of {MODES}, got {cls.mode!r}")
        TASKS.register(name, cls)  # ValueError: task name 'x' is already registered to OtherTask
        cls.name = name
        return cls

    return decorator


def list_tasks() -> list[str]:
    return TASKS.names()


def task_fields(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_task_class(name))]


def _task_class(name: str) -> type[Task]:
    return TASKS.get(name)  # ValueError: unknown task 'x'; available tasks: ...


def get_task(name: str, **fields) -> Task:
    """Build task `name`, overriding its fields (e.g. n_samples=5)."""
    cls = _task_class(name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"task {name!r} has no field(s) {', '.join(unknown)}; its fields are: {', '.join(known)}")
    return cls(**fields)


__all__ = ["Task", "contains_number", "get_task", "list_tasks", "register_task", "task_fields"]
