"""Config nodes -> objects: the strategy, task and load_model call a composed config describes.

Every bad value becomes a ConfigError whose text is the one line the CLI prints: the key
(strategy.merge, task.n_samples, model.dtype, ...) and what it allows.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..registry import list_strategies, strategy_class
from ..validate import is_number
from .errors import ConfigError
from .schema import init_fields

__all__ = ["ConfigError", "build_strategy", "build_task", "import_strategy_class", "model_call"]


def import_strategy_class(target: str) -> type:
    """The class at import path `target` ("package.module.Class"), checked to be a strategy dataclass."""
    from ..strategy import EvictionStrategy

    module_name, _, attr = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr) if module_name else None
    except (ImportError, AttributeError) as err:
        raise ConfigError("strategy._target_", f"cannot import {target!r} ({err})") from None
    if cls is None:
        raise ConfigError("strategy._target_", f"expected an import path like my_package.MyStrategy, got {target!r}")
    if not (isinstance(cls, type) and issubclass(cls, EvictionStrategy) and dataclasses.is_dataclass(cls)):
        raise ConfigError("strategy._target_", f"{target!r} is not an EvictionStrategy dataclass")
    return cls


def build_strategy(node: DictConfig | dict):
    """The strategy a config node describes (`name` + fields, or `_target_` + fields).

    Raises ConfigError naming the offending key (strategy.<field>) and what it allows.
    """
    data = _as_dict(node)
    target = data.pop("_target_", None)
    name = data.pop("name", None)
    if target:
        cls, defaults, label = import_strategy_class(target), {}, target
    else:
        if name not in list_strategies():
            raise ConfigError("strategy", f"unknown strategy {name!r}; choose one of: {', '.join(list_strategies())}")
        (cls, defaults), label = strategy_class(name), name
    fields = [f.name for f in init_fields(cls)]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"strategy.{unknown[0]}", f"{label} has no such field; its fields are: {', '.join(fields)}")
    try:
        return cls(**{**defaults, **data})
    except (ValueError, TypeError) as err:
        raise ConfigError(_field_key("strategy", str(err), fields, data), str(err)) from None


def strategy_points(cfg: DictConfig) -> list[tuple[dict, object, bool]]:
    """(config node, strategy, is it the command line's strategy?) of every strategy the run evaluates:
    `strategy`, then each of `also` (at strategy.budget), each at every budget of `budgets` if any."""
    main = _as_dict(cfg.strategy)
    nodes = [(main, True)]
    also = cfg.get("also")
    if also is None:  # the main job's default: LOOK-M beside the recommended strategy
        from .config import MAIN_JOB_ALSO, MAIN_JOB_STRATEGY

        also = list(MAIN_JOB_ALSO) if main.get("name") == MAIN_JOB_STRATEGY else []
    for name in also:
        if name not in list_strategies():
            raise ConfigError("also", f"unknown strategy {name!r}; choose from: {', '.join(list_strategies())}")
        node = {"name": name}
        if name != "full":
            budget_key = "budget_tokens" if main.get("budget_tokens") is not None else "budget"
            if main.get(budget_key) is not None:
                node[budget_key] = main[budget_key]
        nodes.append((node, False))
    budgets = list(cfg.get("budgets") or [])
    for b in budgets:
        if not is_number(b) or not 0 < b <= 1:
            raise ConfigError("budgets", f"each budget must be a number in (0, 1], got {b!r}")
    if budgets:
        nodes = [
            (point, is_main)
            for node, is_main in nodes
            for point in (
                [node]
                if node.get("name") == "full"
                else [{**{k: v for k, v in node.items() if k != "budget_tokens"}, "budget": b} for b in budgets]
            )
        ]
    points = [(node, build_strategy(node), is_main) for node, is_main in nodes]
    result_file = str(cfg.get("result_file") or "result.json")
    if len(points) > 1 and (os.path.isabs(result_file) or ".." in Path(result_file).parts):
        raise ConfigError(
            "result_file",
            f"must stay inside the run's directory when the run evaluates several strategies (also / budgets: "
            f"each point writes its own, <run dir>/<strategy>@<budget>/<result_file>), got {result_file!r}",
        )
    return points


def build_task(node: DictConfig | dict):
    """The kvpress_mm.eval task a config node describes (`name` + fields)."""
    from kvpress_mm.eval import get_task, list_tasks

    data = _as_dict(node)
    name = data.pop("name", None)
    if name not in list_tasks():
        raise ConfigError("task", f"unknown task {name!r}; choose one of: {', '.join(list_tasks())}")
    try:
        return get_task(name, **data)
    except (ValueError, TypeError) as err:
        raise ConfigError(_field_key("task", str(err), list(data), data), str(err)) from None


def model_call(node: DictConfig | dict) -> tuple[str, dict]:
    """(name, options) for kvpress_mm.eval.load_model from a model node; null options are left out
    (the loader's own default applies)."""
    from kvpress_mm.eval import list_models, model_options

    data = _as_dict(node)
    name = data.pop("name", None)
    if name not in list_models():
        raise ConfigError("model.name", f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    options = {k: v for k, v in data.items() if v is not None}
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]}", f"model {name!r} has no such option; its options are: {', '.join(allowed)}"
        )
    _check_model_options(options)
    return name, options


def _check_model_options(options: dict) -> None:
    """The loader options that would only fail after (or while) the model loads: the attention backend
    and the device."""
    from ..devices import device_problem
    from ..session import SUPPORTED_BACKENDS

    backend = options.get("attn_implementation")
    if isinstance(backend, str) and backend not in SUPPORTED_BACKENDS:
        note = ""
        if backend.startswith("flash_attention") and importlib.util.find_spec("flash_attn") is None:
            note = " (flash-attn is not installed either)"
        raise ConfigError(
            "model.attn_implementation",
            f"{backend!r} is not a backend kvpress-mm compresses{note}; choose one of: {', '.join(SUPPORTED_BACKENDS)}",
        )
    if options.get("device") is not None:
        problem = device_problem(options["device"], key="model.device")
        if problem:
            raise ConfigError("model.device", problem)


def _as_dict(node) -> dict:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def _field_key(group: str, message: str, fields: list[str], values: dict) -> str:
    """group.<field> for the field a validation message is about: the one it says "<field> must ..." of,
    else the one whose given value it quotes ("unknown strategy 'nope'"), else any field it names."""
    by_length = sorted(fields, key=len, reverse=True)
    for name in by_length:
        if re.search(rf"(?<![\w.]){re.escape(name)} must\b", message):
            return f"{group}.{name}"
    for name, value in values.items():
        if isinstance(value, str) and repr(value) in message:
            return f"{group}.{name}"
    for name in by_length:
        if re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message):
            return f"{group}.{name}"
    return group
