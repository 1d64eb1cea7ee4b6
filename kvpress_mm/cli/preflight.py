"""Check a command line before any job starts: compose every sweep point and build its strategy and task.

A bad value (strategy.budget=7, strategy.merge=sideways, an unknown strategy / model / key, threads=-1,
a device torch does not see, an attention backend kvpress-mm does not compress, an output directory or
result_file that cannot be written, a sweep's absolute result_file) then fails at once, as one line naming
the key and what it allows, instead of as a traceback from inside a job (or from the ninth job of a sweep,
after eight models were loaded, or after the whole evaluation, when its result cannot be saved).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ..devices import device_problem
from ..validate import is_int
from .build import ConfigError, build_task, model_call, strategy_points
from .config import CONFIG_MODULE
from .errors import one_line as _one_line

# command-line overrides of Hydra itself (launcher, sweep dir, ...): Hydra checks those on its own;
# hydra.searchpath stays (it decides which model / strategy / task configs exist)
_HYDRA_KEY = re.compile(r"^[+~]*hydra[./](?!searchpath=)")


def check_command_line(config_name: str, overrides: list[str], multirun: bool, config_dir: str | None = None) -> int:
    """Raise ConfigError for the first bad sweep point; return how many points were checked."""
    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3", job_name="kvpress-mm"):
        points = _sweep_points(overrides, multirun)
        seen, configs = set(), []
        for point in points:
            point = extra + [o for o in point if not _HYDRA_KEY.match(o)]
            if tuple(point) in seen:
                continue
            seen.add(tuple(point))
            cfg = _compose(config_name, point)
            check_config(cfg)
            configs.append(cfg)
        # then where the results go: the run / sweep directory, each point's result_file in it
        result_files = dict.fromkeys(str(cfg.result_file) for cfg in configs)
        if multirun:
            for result_file in result_files:
                check_sweep_result_file(result_file)
        job_dir = _check_output_dirs(config_name, extra + (points[0] if points else list(overrides)), multirun)
        if job_dir is not None:
            for result_file in result_files:
                check_result_file(job_dir, result_file)
    return len(seen)


def check_output_dirs(config_name: str, overrides: list[str], multirun: bool, config_dir: str | None = None) -> None:
    """Only the output directories (hydra.run.dir or hydra.sweep.dir, and a top-level `output_dir`) of a
    command without the full preflight (bench): ConfigError when one cannot be created or written."""
    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3", job_name="kvpress-mm"):
        _check_output_dirs(config_name, extra + list(overrides), multirun)


def check_config(cfg: DictConfig) -> None:
    """Build what a job would build (without loading the model): raise ConfigError on a bad value."""
    _check_no_missing(cfg)
    strategy_points(cfg)  # the strategy, each of `also`, at each of `budgets`
    build_task(cfg.task)
    model_call(cfg.model)
    check_run_options(cfg)


def check_run_options(cfg: DictConfig) -> None:
    """The run options (batch_size, threads, device) a job uses: ConfigError naming the key on a bad one.
    Cheap and model-free, so a job repeats it before loading its model."""
    batch_size = cfg.get("batch_size", 1)
    if not is_int(batch_size) or batch_size < 1:
        raise ConfigError("batch_size", f"must be an integer >= 1, got {batch_size}")
    threads = cfg.get("threads")
    if threads is not None and (not is_int(threads) or threads < 0):
        raise ConfigError(
            "threads",
            f"must be an integer >= 0 (0 or null: torch's default; N >= 1: N torch CPU threads), got {threads!r}",
        )
    from ..eval.protocol import PROTOCOLS

    protocol = cfg.get("protocol", "question_aware")
    if protocol not in PROTOCOLS:
        raise ConfigError("protocol", f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    device = cfg.get("device")
    if device is not None:
        problem = device_problem(device)
        if problem:
            raise ConfigError("device", problem)


def check_result_file(job_dir: str | Path, result_file: str) -> None:
    """ConfigError unless <job_dir>/<result_file> (an absolute result_file: itself) can be written."""
    if not str(result_file).strip() or str(result_file).endswith(("/", os.sep)):
        raise ConfigError("result_file", f"must name a file (e.g. result.json), got {result_file!r}")
    problem = writable_problem(Path(job_dir) / str(result_file), directory=False)
    if problem:
        raise ConfigError("result_file", f"{problem}; choose a file name (or path) that can be written")


def check_sweep_result_file(result_file: str) -> None:
    """ConfigError unless a sweep's result_file stays inside each point's directory: an absolute one (or one
    leading out with ..) would have every point write the same file, and the summary could not collect them."""
    path = str(result_file)
    normal = os.path.normpath(path)
    if os.path.isabs(path) or normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise ConfigError(
            "result_file",
            f"must be a path inside each sweep point's directory in a multirun (-m), got {path!r}: every point "
            "would write the same file; use a relative name such as result.json",
        )


def writable_problem(path: str | Path, directory: bool) -> str | None:
    """None when `path` (a directory, or a file with `directory=False`) exists writable or can be created,
    else why not. Probes by creating (and removing) a temporary file: permission bits say nothing to root,
    nor about read-only file systems."""
    path = Path(os.path.abspath(path))
    if path.exists():
        if directory and not path.is_dir():
            return f"{str(path)!r} is a file, not a directory"
        if not directory:
            if path.is_dir():
                return f"{str(path)!r} is a directory"
            return None if os.access(path, os.W_OK) else f"{str(path)!r} is not writable"
        return _probe(path, path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {str(path)!r}: {str(parent)!r} is a file, not a directory"
    return _probe(parent, path)


def _probe(folder: Path, target: Path) -> str | None:
    what = f"cannot write {str(target)!r}" if folder != target else f"cannot write in {str(folder)!r}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{what}: {str(folder)!r} is not writable"
    try:
        handle, name = tempfile.mkstemp(dir=folder, prefix=".kvpress-mm-write-check-")
    except OSError as err:
        return f"{what}: {str(folder)!r} takes no new files ({err.strerror or err})"
    os.close(handle)
    os.unlink(name)
    return None


def _check_output_dirs(config_name: str, overrides: list[str], multirun: bool) -> Path | None:
    """Check the directory Hydra will write to (and `output_dir` when the config has one); return the
    directory a job writes its files to (a sweep: inside hydra.sweep.dir), None when it cannot be resolved
    here (Hydra then reports it)."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        folder = OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception:  # e.g. a launcher's own keys: composing them is Hydra's business
        return None
    if folder is None:
        return None
    problem = writable_problem(folder, directory=True)
    if problem:
        raise ConfigError(key, f"{problem}; choose a directory that can be written")
    output_dir = OmegaConf.select(cfg, "output_dir", default=None) if "output_dir" in cfg else None
    if output_dir is not None:
        problem = writable_problem(output_dir, directory=True)
        if problem:
            raise ConfigError("output_dir", f"{problem}; choose a directory that can be written (or null)")
    if not multirun:
        return Path(str(folder))
    try:
        subdir = OmegaConf.select(cfg, "hydra.sweep.subdir", throw_on_missing=True)
    except Exception:  # ${hydra.job.num}: known only when the job is launched
        subdir = "0"
    return Path(str(folder)) / str(subdir)


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
