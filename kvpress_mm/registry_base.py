"""One small name -> object registry behind every kvpress-mm registry (strategies, model adapters, tasks,
model loaders, tiny model builders).

    STRATEGIES = Registry("strategy", listing="registered strategies",
                          builtins="kvpress_mm.strategies", entry_point_group="kvpress_mm.strategies")

Loading is lazy and happens once, on the first lookup: every module of the `builtins` package(s) is imported
(modules register themselves on import, so adding one is adding a file), then `loader` runs, then the
entry points of `entry_point_group` are loaded. It runs under a lock, and the registry counts as loaded only
once all of that has finished, so threads making their first lookup at the same time all wait for the
complete registry. A lookup from inside the loading (a module that calls get_... on import) sees what is
registered so far instead of deadlocking.

A plugin entry point that fails to load (ImportError, a bad name, a clashing registration, ...) is skipped
with one PluginLoadWarning naming it (`name = value`) and the error; everything else keeps working.
A built-in module that fails to import is a bug of kvpress-mm and raises (the registry stays unloaded).
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
import warnings
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class PluginLoadWarning(RuntimeWarning):
    """A plugin entry point could not be loaded and was skipped."""


def _qualname(obj: object) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)


class Registry(Generic[T]):
    """Names -> objects of one kind, filled lazily from built-in packages, a loader and entry points.

    kind: what a name names, for messages ("strategy" -> "unknown strategy 'x'; ...").
    listing: how the known names are introduced in the unknown-name error ("registered strategies").
    builtins: package(s) whose modules are all imported on first use (pkgutil; names starting with _ skipped).
    loader: called on first use, after the built-ins, to register more (e.g. entries derived from another
        registry).
    entry_point_group: installed plugins; each entry point is loaded and passed to on_entry_point(name, obj)
        (default: register obj under the entry point's name unless the module registered it on import).
    same(old, new): whether registering `new` under a name taken by `old` is the same registration again
        (allowed: a re-import) rather than a clash (a ValueError). Default: identity or equality.
    describe(obj): how a clash message names the registered object (default: its __qualname__).
    """

    def __init__(
        self,
        kind: str,
        *,
        listing: str | None = None,
        builtins: str | Iterable[str] = (),
        loader: Callable[[], None] | None = None,
        entry_point_group: str | None = None,
        on_entry_point: Callable[[str, object], None] | None = None,
        same: Callable[[T, T], bool] | None = None,
        describe: Callable[[T], str] = _qualname,
    ):
        self.kind = kind
        self.listing = listing or "registered"
        self.builtins = (builtins,) if isinstance(builtins, str) else tuple(builtins)
        self.loader = loader
        self.entry_point_group = entry_point_group
        self.on_entry_point = on_entry_point or self._register_entry_point
        self.same = same or (lambda old, new: old is new or old == new)
        self.describe = describe
        # the registered objects; read it through the methods (modules may alias it for old callers)
        self.entries: dict[str, T] = {}
        self._lock = threading.Lock()  # guards `entries` (held briefly, never while importing)
        self._load_lock = threading.RLock()  # held by the loading thread for the whole load
        self._loaded = False
        self._loading = False

    # ------------------------------------------------------------------------------------------ register

    def register(self, name: str, obj: T, *, replace: bool = False) -> T:
        """Register `obj` as `name`; another object under a taken name is a ValueError unless `replace`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        with self._lock:
            existing = self.entries.get(name)
            if existing is not None and not replace and not self.same(existing, obj):
                raise ValueError(f"{self.kind} name {name!r} is already registered to {self.describe(existing)}")
            self.entries[name] = obj
        return obj

    # ------------------------------------------------------------------------------------------- look up

    def get(self, name: str) -> T:
        """The object registered as `name`, or a ValueError naming it and the registered names."""
        self.load()
        try:
            return self.entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise ValueError(f"unknown {self.kind} {name!r}; {self.listing}: {', '.join(self.names())}") from None

    def find(self, name: str, default: T | None = None) -> T | None:
        self.load()
        return self.entries.get(name, default)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self.entries

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self.load()
        with self._lock:
            return sorted(self.entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, object) pairs sorted by name."""
        self.load()
        with self._lock:
            return sorted(self.entries.items(), key=lambda item: item[0])

    # ------------------------------------------------------------------------------------------- loading

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        """Load the built-ins, the loader's entries and the plugins, once (see the module docstring)."""
        if self._loaded:
            return
        with self._load_lock:
            # a second thread waited above for the first to finish; a lookup made while loading (this
            # thread, from a module being imported) sees the entries registered so far
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                self._import_builtins()
                if self.loader is not None:
                    self.loader()
                self._load_entry_points()
                self._loaded = True
            finally:
                self._loading = False

    def reset(self, clear: bool = False) -> None:
        """Forget that the registry was loaded (and, with clear, its entries): for tests."""
        with self._load_lock:
            self._loaded = False
            if clear:
                with self._lock:
                    self.entries.clear()

    def _import_builtins(self) -> None:
        for package_name in self.builtins:
            package = importlib.import_module(package_name)
            for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
                if not module.name.startswith("_"):
                    importlib.import_module(f"{package_name}.{module.name}")

    def _load_entry_points(self) -> None:
        if self.entry_point_group is None:
            return
        for ep in entry_points(group=self.entry_point_group):
            try:
                self.on_entry_point(ep.name, ep.load())
            except Exception as err:  # a broken plugin must not take the others (or the CLI) down
                # one line ("kvpress-mm:0: PluginLoadWarning: skipped ..."): the registry's own source line
                # would say nothing; a warnings filter on the category still applies
                warnings.warn_explicit(
                    f"skipped the {self.kind} plugin entry point '{ep.name} = {ep.value}' "
                    f"(group {self.entry_point_group}): {type(err).__name__}: {err}",
                    PluginLoadWarning,
                    filename="kvpress-mm",
                    lineno=0,
                    module="kvpress_mm.registry_base",
                )

    def _register_entry_point(self, name: str, obj: object) -> None:
        if name not in self.entries:
            self.register(name, obj)
