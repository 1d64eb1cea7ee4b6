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

from ..results import comparison_table, run_record, strategy_label, write_json, write_sweep_summary
from . import errors
from .build import ConfigError, build_task, model_call, strategy_points
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
    from kvpress_mm.eval import evaluate_many, load_model
    from kvpress_mm.eval.runner import EvaluationInterrupted

    started = time.perf_counter()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    # everything a job can check before its model loads (again: another sweeper's points skip the preflight)
    check_run_options(cfg)
    points = strategy_points(cfg)
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
    for _, strategy, _ in points:  # what a strategy checks against the model (its family, a head profile): one line
        try:
            with strategy(bundle.model):
                pass
        except ValueError as err:
            raise ConfigError("strategy", str(err)) from None
    try:
        results, interrupted = (
            evaluate_many(
                bundle,
                task,
                [strategy for _, strategy, _ in points],
                batch_size=cfg.batch_size,
                compare_full=cfg.compare_full,
                progress=cfg.progress,
                device=cfg.device,
                protocol=cfg.protocol,
                likelihood=cfg.likelihood,
                share_prefill=cfg.share_prefill,
            ),
            None,
        )
    except EvaluationInterrupted as stop:
        results, interrupted = stop.results, stop
    done = time.perf_counter()

    records = []
    for (node, _, is_main), result in zip(points, results):
        config = OmegaConf.to_container(cfg, resolve=True)
        config["strategy"] = node
        record = run_record(
            config=config,
            choices={**_choices(hydra_cfg), "strategy": node.get("name") or _choices(hydra_cfg).get("strategy")},
            overrides=_point_overrides(hydra_cfg, is_main),
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
        records.append(record)
    if len(records) == 1:
        path = write_json(output_dir / cfg.result_file, records[0])
    else:  # one record per point, in its own folder; the run's folder gets the summary of them all
        for record in records:
            write_json(output_dir / _point_dir(record) / cfg.result_file, record)
        path = write_sweep_summary(output_dir, cfg.result_file)["csv"]
    if interrupted is not None:
        if hydra_cfg.mode == RunMode.RUN:
            errors.results_in(path.parent)
        raise interrupted  # cli.main turns it into one line and exit 130
    if cfg.print_table and hydra_cfg.mode == RunMode.RUN:
        print("\n" + comparison_table(*records), flush=True)
        print(f"\nresult: {path}", flush=True)
    return records[0]


def _point_overrides(hydra_cfg: DictConfig, main: bool) -> list[str]:
    """The command line's overrides as they concern one point: strategy.* fields only for the main strategy."""
    overrides = list(hydra_cfg.overrides.task)
    return [o for o in overrides if main or not o.lstrip("+~").startswith("strategy.")]


def _point_dir(record: dict) -> str:
    label = strategy_label(record).replace("/", "_")
    budget = record["config"]["strategy"].get("budget")
    tokens = record["config"]["strategy"].get("budget_tokens")
    return f"{label}@{tokens}tok" if tokens is not None else f"{label}@{budget}"


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
