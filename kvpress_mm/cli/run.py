"""The `eval` command's job: one (strategy, model, task) point, evaluated next to the full cache.

Hydra calls `run_eval` once per run or sweep point, in whatever process its launcher chose. The point's
result.json is written when the point ends, whichever way it ends (`status` in the JSON):

    ok           every sample ran
    interrupted  Ctrl-C: the samples finished before it (`"interrupted": true`); the command then exits 130
    failed       a sweep point that raised: `error` holds the one-line text, error.txt the traceback; the
                 sweep goes on with its other points (a single run that fails shows Hydra's traceback)
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ..results import comparison_table, run_record, write_json
from . import errors
from .build import ConfigError, build_strategy, build_task, model_call
from .preflight import check_result_file, check_run_options

TRACEBACK_FILE = "error.txt"  # next to a failed sweep point's result.json


def run_eval(cfg: DictConfig) -> dict:
    """Hydra task function: evaluate, write result.json into the output directory, print the table."""
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        return _run_eval(cfg)
    except ConfigError as err:
        if not in_sweep:
            # a value only the job could check (e.g. a model option): one line, like the CLI's own checks
            errors.fail(err)
        return failed_point(cfg, hydra_cfg, err)
    except Exception as err:
        if not in_sweep:
            raise
        return failed_point(cfg, hydra_cfg, err)


# a multirun on the basic launcher runs every job in this process: load each model once
_BUNDLES: dict = {}


def _load_once(load_model, name: str, options: dict):
    key = (name, repr(sorted(options.items())))
    if key not in _BUNDLES:
        _BUNDLES.clear()  # hold one model at a time
        _BUNDLES[key] = load_model(name, **options)
    return _BUNDLES[key]


def _run_eval(cfg: DictConfig) -> dict:
    from kvpress_mm.eval import evaluate, load_model
    from kvpress_mm.eval.runner import EvaluationInterrupted

    started = time.perf_counter()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    # everything a job can check before its model loads (again: another sweeper's points skip the preflight)
    check_run_options(cfg)
    strategy = build_strategy(cfg.strategy)
    task = build_task(cfg.task)
    model_name, options = model_call(cfg.model)
    check_result_file(output_dir, cfg.result_file)
    if cfg.threads:  # 0 / null: torch's default; the count used is environment.torch_threads in result.json
        import torch

        torch.set_num_threads(int(cfg.threads))
    try:
        bundle = _load_once(load_model, model_name, options)
    except (ValueError, TypeError) as err:
        raise ConfigError("model", str(err)) from None
    loaded = time.perf_counter()
    try:  # what a strategy checks against the model (its family, a head profile) fails here in one line
        with strategy(bundle.model):
            pass
    except ValueError as err:
        raise ConfigError("strategy", str(err)) from None
    try:
        result, interrupted = (
            evaluate(
                bundle,
                task,
                strategy,
                batch_size=cfg.batch_size,
                compare_full=cfg.compare_full,
                progress=cfg.progress,
                device=cfg.device,
                protocol=cfg.protocol,
                likelihood=cfg.likelihood,
            ),
            None,
        )
    except EvaluationInterrupted as stop:
        result, interrupted = stop.result, stop
    done = time.perf_counter()

    record = run_record(
        config=OmegaConf.to_container(cfg, resolve=True),
        choices=_choices(hydra_cfg),
        overrides=list(hydra_cfg.overrides.task),
        metrics=result.to_dict(),
        timings={
            "load_model_seconds": loaded - started,
            "evaluate_seconds": done - loaded,
            "total_seconds": done - started,
        },
        device=cfg.device or _device_of(bundle),
        job=_job(hydra_cfg),
    )
    record["status"] = "interrupted" if interrupted else "ok"
    record["interrupted"] = interrupted is not None
    path = write_json(output_dir / cfg.result_file, record)
    if interrupted is not None:
        if hydra_cfg.mode == RunMode.RUN:
            errors.results_in(path.parent)
        raise interrupted  # cli.main turns it into one line and exit 130
    if cfg.print_table and hydra_cfg.mode == RunMode.RUN:
        print("\n" + comparison_table(record), flush=True)
        print(f"\nresult: {path}", flush=True)
    return record


def failed_point(cfg: DictConfig, hydra_cfg: DictConfig, err: BaseException) -> dict:
    """Write the result.json of a sweep point that raised `err` (status failed, its one-line text) and its
    traceback; return that record, so the sweep goes on and its summary marks the point."""
    output_dir = Path(hydra_cfg.runtime.output_dir)
    line = errors.error_line(err)
    record = {
        "status": "failed",
        "interrupted": False,
        "error": line,
        "job": _job(hydra_cfg),
        "config": _container(cfg),
        "choices": _choices(hydra_cfg),
        "overrides": list(hydra_cfg.overrides.task),
        "metrics": {},
        "command": " ".join(sys.argv),
    }
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        trace = output_dir / TRACEBACK_FILE
        trace.write_text("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        record["traceback"] = str(trace)
        write_json(output_dir / cfg.get("result_file", "result.json"), record)
    except OSError as io_err:
        line += f" (and its record could not be written: {io_err})"
    print(f"{errors.PROG}: sweep point {record['job'].get('num')} failed: {line}", file=sys.stderr, flush=True)
    return record


def _container(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # the failure may be an interpolation that does not resolve
        return OmegaConf.to_container(cfg, resolve=False)


def _choices(hydra_cfg: DictConfig) -> dict:
    return {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/")}


def _job(hydra_cfg: DictConfig) -> dict:
    return {
        "name": hydra_cfg.job.name,
        "num": hydra_cfg.job.get("num"),
        "mode": hydra_cfg.mode.name if hydra_cfg.mode else None,
    }


def _device_of(bundle) -> str | None:
    device = getattr(bundle, "device", None)
    return str(device) if device is not None else None
