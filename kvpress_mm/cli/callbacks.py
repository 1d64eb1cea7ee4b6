"""Hydra callbacks of the CLI (enabled in conf/eval.yaml under hydra.callbacks).

SweepResults: after a multirun, one table (CSV + Markdown) and a score-vs-budget PNG in the sweep directory.
SweepProgress: a tqdm bar over the sweep points when they run in this process (the basic launcher).
Both run in the process that launched the sweep, so they work with every launcher (joblib, submitit).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepResults(Callback):
    """Aggregate the result JSONs the sweep's jobs wrote (see kvpress_mm.results)."""

    def __init__(self) -> None:
        self._started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # results older than this sweep (a reused sweep dir) are left out of its table
        self._started = time.time() - 1.0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ..results import collect, markdown_table, table_rows, write_sweep_summary

        sweep_dir = config.hydra.sweep.dir
        result_file = config.get("result_file", "result.json")
        written = write_sweep_summary(sweep_dir, result_file, newer_than=self._started)
        if not written:
            log.warning(f"no {result_file} found under {sweep_dir}: nothing to aggregate")
            return
        rows = table_rows(collect(sweep_dir, result_file, newer_than=self._started))
        print("\n" + markdown_table(rows), flush=True)
        print("\n" + "\n".join(f"{kind}: {path}" for kind, path in written.items()), flush=True)


class SweepProgress(Callback):
    """A bar over sweep points. Jobs in other processes (joblib, Slurm) report through their launcher's log."""

    def __init__(self) -> None:
        self._bar = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("progress", True) or not _runs_in_process(config):
            return
        total = _count_sweep_points(config)
        if total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="sweep points", unit="run", position=0, leave=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __getstate__(self) -> dict:
        # launchers pickle the callbacks into their workers: the bar stays in this process
        return {**self.__dict__, "_bar": None}


def _runs_in_process(config: DictConfig) -> bool:
    target = str(config.hydra.launcher.get("_target_", ""))
    return target.endswith("BasicLauncher")


def _count_sweep_points(config: DictConfig) -> int | None:
    """How many jobs the basic sweeper will launch for this command line (None: another sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))
    except Exception:  # glob(...) sweeps need the config loader: no total, no bar
        return None
