"""Check a command line before any job starts: compose every sweep point and build its strategy and task.

A bad value (strategy.budget=7, strategy.merge=sideways, an unknown strategy / model / key) then fails
at once, as one line naming the key and what it allows, instead of as a traceback from inside a job
(or from the ninth job of a sweep, after eight models were loaded).
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from .build import ConfigError, build_strategy, build_task, model_call
from .config import CONFIG_MODULE

# command-line overrides of Hydra itself (launcher, sweep dir, ...): Hydra checks those on its own;
# hydra.searchpath stays (it decides which model / strategy / task configs exist)
_HYDRA_KEY = re.compile(r"^[+~]*hydra[./](?!searchpath=)")


def check_command_line(config_name: str, overrides: list[str], multirun: bool, config_dir: str | None = None) -> int:
    """Raise ConfigError for the first bad sweep point; return how many points were checked."""
    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3", job_name="kvpress-mm"):
        points = _sweep_points(overrides, multirun)
        seen = set()
        for point in points:
            point = extra + [o for o in point if not _HYDRA_KEY.match(o)]
            if tuple(point) in seen:
                continue
            seen.add(tuple(point))
            check_config(_compose(config_name, point))
    return len(seen)


def check_config(cfg: DictConfig) -> None:
    """Build what a job would build (without loading the model): raise ConfigError on a bad value."""
    _check_no_missing(cfg)
    build_strategy(cfg.strategy)
    build_task(cfg.task)
    model_call(cfg.model)
    if cfg.batch_size < 1:
        raise ConfigError("batch_size", f"must be an integer >= 1, got {cfg.batch_size}")
    if cfg.device is not None:
        import torch

        try:
            torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise ConfigError("device", f"not a torch device: {cfg.device!r} (e.g. cpu, cuda, cuda:1, mps)") from None


def _sweep_points(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of the jobs Hydra's basic sweeper will launch (one list in run mode)."""
    if not multirun:
        return [list(overrides)]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(re.match(r"^[+~]*hydra/sweeper=", o) for o in overrides):
        return []  # another sweeper (e.g. optuna) chooses its own points: leave them to it
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    try:
        parsed = parser.parse_overrides(list(overrides))
        batches = BasicSweeper.split_arguments(parsed, None)
    except OverrideParseException as err:
        raise ConfigError(_key(err.override), f"cannot parse {err.override!r}: {_one_line(err.message)}") from None
    except HydraException as err:  # e.g. interval() sweeps, which need another sweeper
        raise ConfigError("", _one_line(str(err))) from None
    return [point for batch in batches for point in batch]


def _compose(config_name: str, point: list[str]) -> DictConfig:
    try:
        return compose(config_name=config_name, overrides=point)
    except MissingConfigException as err:
        raise _missing_option(err) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise _composition_error(err, config_name, point) from None


def _missing_option(err: MissingConfigException) -> ConfigError:
    missing = str(err.missing_cfg_file or "")
    group, _, option = missing.rpartition("/")
    if group and err.options:
        return ConfigError(group, f"no config {option!r}; choose one of: {', '.join(err.options)}")
    return ConfigError("", _one_line(str(err)))


def _composition_error(err: Exception, config_name: str, point: list[str]) -> ConfigError:
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    key = getattr(cause, "full_key", None) or ""
    message = getattr(cause, "msg", None) or str(cause)
    # OmegaConf appends "full_key: ... object_type=..." lines (the key is named anyway); Hydra puts hints there
    first = message.strip().splitlines()[0] if isinstance(cause, OmegaConfBaseException) else _one_line(message)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        parent_key, _, leaf = key.rpartition(".")
        allowed = _allowed_keys(config_name, point, parent_key, leaf)
        if allowed is not None:
            return ConfigError(key, f"no such key; {parent_key or 'the config'} has: {', '.join(allowed)}")
        return ConfigError(key, f"no such key ({first})")
    if not key:
        match = re.search(r"override '([^']+)'", str(err))
        key = match.group(1).split("=", 1)[0].lstrip("+~") if match else ""
    return ConfigError(key, first)


def _allowed_keys(config_name: str, point: list[str], parent_key: str, leaf: str) -> list[str] | None:
    """The keys of node `parent_key` with the other overrides of this point (group choices) applied."""
    failing = f"{parent_key}.{leaf}" if parent_key else leaf
    # keep the group choices (they decide the node's keys), drop the failing override itself
    leaf_overrides = [o for o in point if "." not in _key(o) and _key(o) != failing]
    try:
        cfg = compose(config_name=config_name, overrides=leaf_overrides)
        node = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    except Exception:
        return None
    return list(node.keys()) if isinstance(node, DictConfig) else None


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _check_no_missing(cfg: DictConfig) -> None:
    for key in OmegaConf.missing_keys(cfg):
        raise ConfigError(key, f"needs a value (set {key}=...)")


def _one_line(text: str) -> str:
    """Hydra's messages put hints on further lines ("1. To use it as a list, ..."): keep them, joined."""
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())
