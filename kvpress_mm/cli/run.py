"""The `eval` command's job: one (strategy, model, task) point, evaluated next to the full cache.

Hydra calls `run_eval` once per run or sweep point, in whatever process its launcher chose.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .build import ConfigError, build_strategy, build_task, model_call
from ..results import comparison_table, run_record, write_json


def run_eval(cfg: DictConfig) -> dict:
    """Hydra task function: evaluate, write result.json into the output directory, print the table."""
    try:
        return _run_eval(cfg)
    except ConfigError as err:
        # a value only the job could check (e.g. a model option): one line, like the CLI's own checks
        print(f"kvpress-mm: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


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

    started = time.perf_counter()
    if cfg.threads:
        import torch

        torch.set_num_threads(int(cfg.threads))
    strategy = build_strategy(cfg.strategy)
    task = build_task(cfg.task)
    model_name, options = model_call(cfg.model)
    try:
        bundle = _load_once(load_model, model_name, options)
    except (ValueError, TypeError) as err:
        raise ConfigError("model", str(err)) from None
    loaded = time.perf_counter()
    result = evaluate(
        bundle, task, strategy,
        batch_size=cfg.batch_size, compare_full=cfg.compare_full, progress=cfg.progress, device=cfg.device,
    )
    done = time.perf_counter()

    hydra_cfg = HydraConfig.get()
    record = run_record(
        config=OmegaConf.to_container(cfg, resolve=True),
        choices={k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/")},
        overrides=list(hydra_cfg.overrides.task),
        metrics=result.to_dict(),
        timings={
            "load_model_seconds": loaded - started,
            "evaluate_seconds": done - loaded,
            "total_seconds": done - started,
        },
        device=cfg.device or _device_of(bundle),
        job={
            "name": hydra_cfg.job.name,
            "num": hydra_cfg.job.get("num"),
            "mode": hydra_cfg.mode.name if hydra_cfg.mode else None,
        },
    )
    path = write_json(Path(hydra_cfg.runtime.output_dir) / cfg.result_file, record)
    if cfg.print_table and hydra_cfg.mode == RunMode.RUN:
        print("\n" + comparison_table(record), flush=True)
        print(f"\nresult: {path}", flush=True)
    return record


def _device_of(bundle) -> str | None:
    device = getattr(bundle, "device", None)
    return str(device) if device is not None else None
