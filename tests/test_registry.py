"""The registries: broken plugins are skipped with one warning, first lookups from many threads, the Registry class."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

import kvpress_mm
from kvpress_mm import registry
from kvpress_mm.registry_base import PluginLoadWarning, Registry

BROKEN_EP = "kvmm_broken_plugin = kvmm_broken_plugin:Strategy"


def _fake_dist(root: Path, name: str, group: str, entry_points: list[str], modules: dict[str, str]) -> Path:
    """What `pip install` of a plugin leaves on a path entry: its modules and a dist-info with entry points."""
    root.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist = root / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{ep}\n" for ep in entry_points))
    return root


def _broken_strategy_plugin(root: Path) -> Path:
    return _fake_dist(
        root,
        "kvmm_broken_plugin",
        registry.ENTRY_POINT_GROUP,
        [BROKEN_EP],
        {"kvmm_broken_plugin": "import kvmm_no_such_dependency\n"},
    )


@pytest.fixture
def unloaded_strategies():
    """The strategy registry as in a fresh process (not loaded yet), put back as it was afterwards."""
    reg = registry.STRATEGIES
    reg.load()
    saved = dict(reg.entries)
    reg.reset()
    yield reg
    reg.reset(clear=True)
    reg.entries.update(saved)  # the same dict object (registry._REGISTRY is an alias)


def _plugin_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]


# ------------------------------------------------------------------------------------------- broken plugins


def test_plugin_whose_import_fails_is_skipped_with_one_warning(tmp_path, monkeypatch, unloaded_strategies):
    monkeypatch.syspath_prepend(str(_broken_strategy_plugin(tmp_path / "site")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strategy = kvpress_mm.get_strategy("snapkv", budget=0.3)  # the first lookup loads the plugins
        names = kvpress_mm.list_strategies()
        kvpress_mm.get_strategy("h2o")
    assert type(strategy).__name__ == "SnapKV" and strategy.budget == 0.3
    (message,) = _plugin_warnings(caught)
    assert BROKEN_EP in message
    assert "ModuleNotFoundError" in message and "kvmm_no_such_dependency" in message
    assert len([w for w in caught if "kvmm_broken_plugin" in str(w.message)]) == 1
    assert "kvmm_broken_plugin" not in names and {"h2o", "snapkv", "look_m", "full"} <= set(names)


def test_plugin_naming_a_missing_class_or_taking_a_builtin_name_is_skipped(tmp_path, monkeypatch, unloaded_strategies):
    plugin = """
        from dataclasses import dataclass
        from kvpress_mm import EvictionStrategy, Plan, register_strategy
        from kvpress_mm.selection import first_tokens

        @register_strategy("snapkv")  # taken by a built-in
        @dataclass
        class NotSnapKV(EvictionStrategy):
            def plan(self, layer):
                return Plan(keep=first_tokens(layer, layer.keep_count)[:, None, :])
    """
    good = """
        from dataclasses import dataclass
        from kvpress_mm import EvictionStrategy, Plan
        from kvpress_mm.selection import first_tokens

        @dataclass
        class KeepFirst(EvictionStrategy):
            def plan(self, layer):
                return Plan(keep=first_tokens(layer, layer.keep_count)[:, None, :])
    """
    eps = [
        "kvmm_missing = kvmm_good_plugin:NoSuchClass",
        "kvmm_clash = kvmm_clash_plugin:NotSnapKV",
        "kvmm_keep_first = kvmm_good_plugin:KeepFirst",
    ]
    root = _fake_dist(
        tmp_path / "site",
        "kvmm_mixed_plugins",
        registry.ENTRY_POINT_GROUP,
        eps,
        {"kvmm_clash_plugin": plugin, "kvmm_good_plugin": good},
    )
    monkeypatch.syspath_prepend(str(root))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = kvpress_mm.list_strategies()
    messages = _plugin_warnings(caught)
    assert len(messages) == 2
    assert any(eps[0] in m and "AttributeError" in m and "NoSuchClass" in m for m in messages)
    assert any(eps[1] in m and "already registered" in m for m in messages)
    assert "kvmm_keep_first" in names and "kvmm_missing" not in names and "kvmm_clash" not in names
    assert type(kvpress_mm.get_strategy("snapkv")).__name__ == "SnapKV"


def test_cli_help_with_a_broken_plugin_installed(tmp_path):
    root = _broken_strategy_plugin(tmp_path / "site")
    script = Path(sys.executable).with_name("kvpress-mm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kvpress_mm.cli"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run([*command, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    assert result.stderr.count(BROKEN_EP) == 1 and "kvmm_no_such_dependency" in result.stderr
    assert "snapkv" in result.stdout


# ------------------------------------------------------------------------------------------ thread safety


@pytest.fixture
def strategies_as_in_a_new_process(monkeypatch, unloaded_strategies):
    """No strategy registered and none of kvpress_mm.strategies imported; put back afterwards."""
    package = importlib.import_module("kvpress_mm.strategies")
    prefix = "kvpress_mm.strategies."
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix):
            monkeypatch.setattr(package, name[len(prefix) :], module)  # restored afterwards
            monkeypatch.delitem(sys.modules, name)

    def forget():
        unloaded_strategies.reset(clear=True)
        for name in [n for n in sys.modules if n.startswith(prefix)]:
            del sys.modules[name]

    forget()
    return forget


def test_first_lookups_from_many_threads_all_see_every_strategy(monkeypatch, strategies_as_in_a_new_process):
    reg = registry.STRATEGIES
    import_builtins = reg._import_builtins

    def slow_import_builtins():  # a wider window between "loading started" and "loading finished"
        time.sleep(0.05)
        import_builtins()

    monkeypatch.setattr(reg, "_import_builtins", slow_import_builtins)
    n_threads = 8
    for _ in range(20):
        strategies_as_in_a_new_process()
        barrier = threading.Barrier(n_threads)
        built, errors = [], []

        def first_lookup():
            barrier.wait()
            try:
                built.append(kvpress_mm.get_strategy("h2o"))
            except Exception as err:  # noqa: BLE001 - collected for the assertion
                errors.append(err)

        threads = [threading.Thread(target=first_lookup) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors[:2]
        assert len(built) == n_threads and len({type(s) for s in built}) == 1
        assert {"h2o", "snapkv", "look_m", "adakv"} <= set(kvpress_mm.list_strategies())


# ----------------------------------------------------------------------------------------- Registry class


def test_duplicate_registration_of_another_object_raises():
    reg = Registry("gadget", listing="known gadgets")
    first, second = object(), object()
    assert reg.register("a", first) is first
    reg.register("a", first)  # the same object again (a re-import) is fine
    with pytest.raises(ValueError, match="gadget name 'a' is already registered to"):
        reg.register("a", second)
    assert reg.get("a") is first
    reg.register("a", second, replace=True)
    assert reg.get("a") is second
    with pytest.raises(ValueError, match="gadget name must be a non-empty string"):
        reg.register("", first)


def test_unknown_name_lists_the_registered_names():
    reg = Registry("gadget", listing="known gadgets")
    reg.register("spanner", 1)
    reg.register("hammer", 2)
    with pytest.raises(ValueError, match=r"^unknown gadget 'drill'; known gadgets: hammer, spanner$"):
        reg.get("drill")
    assert reg.find("drill") is None and "drill" not in reg and "hammer" in reg
    assert reg.names() == ["hammer", "spanner"] and reg.items() == [("hammer", 2), ("spanner", 1)]


def test_lazy_loader_runs_once_even_from_many_threads():
    calls = []

    def loader():
        calls.append(threading.get_ident())
        time.sleep(0.05)
        assert reg.names() == ["early"]  # a lookup from inside the loading sees what is there so far
        reg.register("late", 2)

    reg = Registry("gadget", loader=loader)
    reg.register("early", 1)
    assert calls == [] and not reg.loaded  # nothing loads before the first lookup
    barrier = threading.Barrier(8)
    seen = []

    def lookup():
        barrier.wait()
        seen.append(reg.names())

    threads = [threading.Thread(target=lookup) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(calls) == 1 and reg.loaded
    assert seen == [["early", "late"]] * 8
    reg.get("late")
    assert len(calls) == 1


def test_failed_loading_is_not_marked_loaded():
    attempts = []

    def loader():
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("disk on fire")
        reg.register("x", 1)

    reg = Registry("gadget", loader=loader)
    with pytest.raises(RuntimeError, match="disk on fire"):
        reg.names()
    assert not reg.loaded
    assert reg.get("x") == 1 and len(attempts) == 2 and reg.loaded


def test_entry_point_group_skips_broken_plugins(tmp_path, monkeypatch):
    group = "kvpress_mm_test.gadgets"
    eps = ["good = kvmm_gadgets:GOOD", "broken = kvmm_gadgets_broken:THING"]
    root = _fake_dist(
        tmp_path,
        "kvmm_gadgets",
        group,
        eps,
        {"kvmm_gadgets": "GOOD = 'a good gadget'\n", "kvmm_gadgets_broken": "raise ImportError('no')\n"},
    )
    monkeypatch.syspath_prepend(str(root))
    reg = Registry("gadget", entry_point_group=group)
    with pytest.warns(PluginLoadWarning, match="'broken = kvmm_gadgets_broken:THING'.*ImportError: no") as caught:
        assert reg.names() == ["good"]
    assert len(caught) == 1
    assert reg.get("good") == "a good gadget"


def test_builtins_are_every_module_of_their_package():
    """Adding a strategy, adapter, task or tiny family is adding a module: no list to update."""
    import pkgutil

    from kvpress_mm import adapters, testing
    from kvpress_mm.eval import tasks

    for package, reg in [
        (adapters, adapters.ADAPTERS),
        (tasks, tasks.TASKS),
        (testing, testing.tiny.BUILDERS),
        (importlib.import_module("kvpress_mm.strategies"), registry.STRATEGIES),
    ]:
        assert reg.builtins == (package.__name__,)
        reg.load()
        modules = {f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)}
        assert modules <= set(sys.modules), modules - set(sys.modules)


# --------------------------------------------------------------------------------------- ported registries


def test_every_tiny_family_has_a_model_loader_and_an_adapter():
    from kvpress_mm.adapters import adapter_for
    from kvpress_mm.eval import list_models
    from kvpress_mm.testing import TINY_FAMILIES

    assert TINY_FAMILIES == tuple(sorted(TINY_FAMILIES)) and len(TINY_FAMILIES) >= 11
    assert {f"tiny_{f}" for f in TINY_FAMILIES} <= set(list_models())
    for family in TINY_FAMILIES:  # the tiny family's name is its config.model_type
        assert adapter_for(SimpleNamespace(config=SimpleNamespace(model_type=family))).family in (
            kvpress_mm.supported_families()
        )


def test_adapter_for_a_taken_model_type_needs_replace():
    from kvpress_mm.adapters import ADAPTERS, ModelAdapter, register_adapter

    llava = ADAPTERS.get("llava")
    other = ModelAdapter(family="my_llava", model_types=("llava",), decoder_path="model")
    with pytest.raises(ValueError, match="model type name 'llava' is already registered to the llava adapter"):
        register_adapter(other)
    try:
        register_adapter(other, replace=True)
        assert ADAPTERS.get("llava") is other
    finally:
        register_adapter(llava, replace=True)
    register_adapter(llava)  # the same adapter again is fine


def test_ported_unknown_name_messages():
    from kvpress_mm.eval import get_task, load_model
    from kvpress_mm.testing import build_tiny

    with pytest.raises(ValueError, match="^unknown strategy 'sideways'; registered strategies: .*h2o.*snapkv"):
        kvpress_mm.get_strategy("sideways")
    with pytest.raises(ValueError, match="^unknown task 'needle'; available tasks: .*fidelity"):
        get_task("needle")
    with pytest.raises(ValueError, match="^unknown model 'llava-7b'; available models: .*hub.*tiny_llava"):
        load_model("llava-7b")
    with pytest.raises(ValueError, match="^unknown tiny model family 'gpt2'; known: gemma3, .*smolvlm$"):
        build_tiny("gpt2")
    with pytest.raises(ValueError, match="^model family 'gpt2' .*supported families: gemma3, .*qwen2_vl$"):
        kvpress_mm.adapters.adapter_for(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))
