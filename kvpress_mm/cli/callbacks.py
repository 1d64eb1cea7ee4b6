"""Hydra callbacks of the CLI (enabled in conf/eval.yaml under hydra.callbacks).

SweepResults: one table (CSV + Markdown) and a score-vs-budget PNG in the sweep directory, refreshed after
    every point and written once more at the end (or on Ctrl-C): a sweep that is killed, interrupted or has
    a failed point still has the summary of what finished, the failed / interrupted points marked (status).
SweepProgress: a tqdm bar over the sweep points when they run in this process (the basic launcher).
on_multirun_* run in the process that launched the sweep, on_job_end where the job ran, so they work with
every launcher (joblib, submitit).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import errors

log = logging.getLogger(__name__)


class SweepResults(Callback):
    """Aggregate the result JSONs the sweep's jobs wrote (see kvpress_mm.results)."""

    def __init__(self) -> None:
        self._started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # results older than this sweep (a reused sweep dir) are left out of its table
        self._started = time.time() - 1.0
        errors.on_interrupt(lambda: self._summarize(config, interrupted=True))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if not _in_sweep(config):  # a single run has no sweep summary (Hydra calls this for it too)
            return
        if job_return.status == JobStatus.FAILED:  # raised past the job function (eval's marks itself)
            self._mark_failed(config, job_return)
        try:
            self._write(config)
        except Exception as err:  # a summary that cannot be refreshed must not stop the sweep
            log.warning(f"sweep summary not refreshed: {errors.error_line(err)}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._summarize(config)

    def _write(self, config: DictConfig) -> dict:
        from ..results import write_sweep_summary

        return write_sweep_summary(config.hydra.sweep.dir, _result_file(config), newer_than=self._started)

    def _summarize(self, config: DictConfig, interrupted: bool = False) -> None:
        """Write the summary, print its table and files; exit 1 when a point failed (not on an interrupt:
        that exits 130 with its own line)."""
        from ..results import collect, markdown_table, table_rows

        sweep_dir, result_file = config.hydra.sweep.dir, _result_file(config)
        written = self._write(config)
        if not written:
            if not interrupted:
                log.warning(f"no {result_file} found under {sweep_dir}: nothing to aggregate")
            return
        errors.results_in(sweep_dir)
        rows = table_rows(collect(sweep_dir, result_file, newer_than=self._started))
        print("\n" + markdown_table(rows), flush=True)
        print("\n" + "\n".join(f"{kind}: {path}" for kind, path in written.items()), flush=True)
        failed = [r for r in rows if r["status"] == "failed"]
        if failed and not interrupted:
            first = failed[0]
            errors.fail(
                f"{len(failed)} of {len(rows)} sweep points failed (status in {written['csv']}); "
                f"job {first['job']}: {first['error']}",
                code=errors.EXIT_FAILED,
            )

    def _mark_failed(self, config: DictConfig, job_return: Any) -> None:
        from .run import failed_point

        output_dir = Path(str(config.hydra.runtime.output_dir))
        result = output_dir / _result_file(config)
        if result.exists() and (self._started is None or result.stat().st_mtime >= self._started):
            return
        err = job_return._return_value
        if isinstance(err, BaseException):
            failed_point(job_return.cfg or config, config.hydra, err)


def _in_sweep(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode", default=None) == RunMode.MULTIRUN


def _result_file(config: DictConfig) -> str:
    return str(config.get("result_file", "result.json"))


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
            errors.on_interrupt(self._close)  # before the interrupt's lines are printed

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
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
