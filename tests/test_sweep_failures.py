"""Sweeps and interrupts, in-process on a tiny model: a failed sweep point is a row of the summary (status
failed, its error) next to the points that finished; the summary is refreshed after every point; Ctrl-C
stops with one line and exit 130, keeping what was done (a single run: the samples finished so far)."""

from __future__ import annotations

import csv
import json
import sys
import textwrap

import pytest
from helpers import run_cli

import kvpress_mm.cli.run as cli_run
from kvpress_mm.eval import runner as runner_mod
from kvpress_mm.results import markdown_table, table_rows

TINY = [
    "model=tiny_llama",
    "task=fidelity",
    "task.n_samples=1",
    "task.max_new_tokens=2",
    "task.context_tokens=48",
    "progress=false",
    "also=[]",  # the default strategy alone (not the main job's LOOK-M beside it)
]

PLUGIN = '''
from dataclasses import dataclass

from kvpress_mm import EvictionStrategy, Plan
from kvpress_mm.selection import last_tokens


@dataclass
class Trips(EvictionStrategy):
    """Keeps the last tokens; at budget 0.5 it raises (fail: an error, stop: a Ctrl-C) in plan."""

    trip: str = "fail"

    def plan(self, layer):
        if self.budget == 0.5:
            if self.trip == "stop":
                raise KeyboardInterrupt
            raise RuntimeError("tripped at budget 0.5\\n(a second line of the message)")
        return Plan(keep=last_tokens(layer, layer.keep_count)[:, None, :])


LAYER1_PLANS = []


@dataclass
class StopsAtLayer1(EvictionStrategy):
    """Keeps the last tokens; a Ctrl-C in plan at layer 1 (after layer 0 was compacted) of prompt `stop_at`."""

    stop_at: int = 3

    def plan(self, layer):
        if layer.layer_idx == 1:
            LAYER1_PLANS.append(layer.length)
            if len(LAYER1_PLANS) == self.stop_at:
                raise KeyboardInterrupt
        return Plan(keep=last_tokens(layer, layer.keep_count)[:, None, :])
'''
TARGET = "strategy._target_=kvmm_sweep_plugin.Trips"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(runner_mod, "WARMUP_NEW_TOKENS", 0)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "kvmm_sweep_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sys.modules.pop("kvmm_sweep_plugin", None)


def summary_rows(sweep) -> list[dict]:
    with (sweep / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_failed_point_is_marked_and_the_finished_points_are_summarized(tmp_path, capsys, monkeypatch):
    # the summary is refreshed after every point: look at it as each job starts
    seen = []
    real = cli_run._run_eval

    def spy(cfg):
        csv_file = tmp_path / "sweep" / "results.csv"
        rows = summary_rows(tmp_path / "sweep") if csv_file.exists() else None
        seen.append(None if rows is None else [(r["budget"], r["status"]) for r in rows])
        return real(cfg)

    monkeypatch.setattr(cli_run, "_run_eval", spy)
    code, out, err = run_cli(["-m", *TINY, TARGET, "strategy.budget=0.25,0.5,0.75", "hydra.sweep.dir=sweep"], capsys)
    sweep = tmp_path / "sweep"
    assert seen == [None, [("0.25", "ok")], [("0.25", "ok"), ("0.5", "failed")]]

    rows = summary_rows(sweep)
    assert [(r["job"], r["budget"], r["status"]) for r in rows] == [
        ("0", "0.25", "ok"),
        ("1", "0.5", "failed"),
        ("2", "0.75", "ok"),
    ]
    failed = rows[1]
    assert failed["error"] == "RuntimeError: tripped at budget 0.5 (a second line of the message)"
    assert failed["score"] == "" and rows[0]["score"] and rows[2]["score"]
    markdown = (sweep / "results.md").read_text()
    assert "| status |" in markdown and "| failed |" in markdown and "RuntimeError: tripped" in markdown
    assert "| failed |" in out  # the table is printed too
    assert (sweep / "score_vs_budget.png").read_bytes()[:4] == b"\x89PNG"  # from the points that finished
    assert "0.5" not in (sweep / "scores.md").read_text().split("\n\n", 1)[1].splitlines()[0]  # not a budget column

    # the failed point's own record and traceback
    record = json.loads((sweep / "1" / "result.json").read_text())
    assert record["status"] == "failed" and record["error"] == failed["error"]
    assert record["config"]["strategy"]["budget"] == 0.5
    assert "Traceback" in (sweep / "1" / "error.txt").read_text()
    assert json.loads((sweep / "0" / "result.json").read_text())["status"] == "ok"

    # the sweep ends with the table printed, then fails: exit 1, its last line naming the point
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("kvpress-mm: error: 1 of 3 sweep points failed") and "job 1: RuntimeError" in last
    assert "Traceback" not in err


def test_a_job_function_that_raises_is_marked_by_the_callback(tmp_path, capsys, monkeypatch):
    """Even an error that escapes the job function (Hydra then ends the sweep with its traceback) leaves a
    summary with the point marked failed: the callback writes its record after each job."""
    real = cli_run.run_eval

    def escapes(cfg):
        if cfg.strategy.budget == 0.5:
            raise OSError("disk on fire")
        return real(cfg)

    monkeypatch.setattr(cli_run, "run_eval", escapes)
    code, out, err = run_cli(["-m", *TINY, "strategy.budget=0.25,0.5", "hydra.sweep.dir=sweep"], capsys)
    assert code == 1
    rows = summary_rows(tmp_path / "sweep")
    assert [(r["budget"], r["status"], r["error"]) for r in rows] == [
        ("0.25", "ok", ""),
        ("0.5", "failed", "OSError: disk on fire"),
    ]


def test_interrupted_sweep_keeps_the_summary_of_what_finished(tmp_path, capsys):
    code, out, err = run_cli(
        ["-m", *TINY, TARGET, "strategy.trip=stop", "strategy.budget=0.25,0.5,0.75", "hydra.sweep.dir=sweep"], capsys
    )
    assert code == 130
    assert err.strip().splitlines()[-1] == "kvpress-mm: interrupted; results so far in sweep"
    assert "Traceback" not in err
    rows = summary_rows(tmp_path / "sweep")
    assert [(r["budget"], r["status"]) for r in rows] == [("0.25", "ok"), ("0.5", "interrupted")]  # 0.75 never ran
    record = json.loads((tmp_path / "sweep" / "1" / "result.json").read_text())
    assert record["interrupted"] is True and record["metrics"]["n_samples"] == 0


def test_interrupted_run_saves_the_samples_finished_so_far(tmp_path, capsys, monkeypatch):
    batches = runner_mod._batches

    def stop_after_two(items, size):  # Ctrl-C while the third sample starts
        for k, batch in enumerate(batches(items, size)):
            if k == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(runner_mod, "_batches", stop_after_two)
    args = [*TINY[:2], "task.n_samples=5", *TINY[3:], "strategy=h2o", "hydra.run.dir=run"]
    code, out, err = run_cli(args, capsys)
    assert code == 130
    assert err.strip().splitlines() == [f"kvpress-mm: interrupted; results so far in {tmp_path / 'run'}"]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["interrupted"] is True and record["status"] == "interrupted"
    m = record["metrics"]
    assert m["n_samples"] == 2 and len(m["samples"]) == 2 and m["interrupted"] is True
    assert m["score"] is not None and 0 < m["kept_fraction"] < 1
    assert "interrupted after 2 of 5 samples" in m["notes"]


def test_interrupt_in_plan_at_a_later_layer_saves_the_samples_finished_so_far(tmp_path, capsys):
    """Ctrl-C inside a strategy's plan at layer 1 of the third sample (layer 0 already compacted): exit 130
    with the two finished samples saved, not a traceback of the half-compacted cache."""
    args = [*TINY[:2], "task.n_samples=5", *TINY[3:], "strategy._target_=kvmm_sweep_plugin.StopsAtLayer1"]
    code, out, err = run_cli([*args, "hydra.run.dir=run"], capsys)
    assert code == 130
    assert err.strip().splitlines() == [f"kvpress-mm: interrupted; results so far in {tmp_path / 'run'}"]
    assert len(sys.modules["kvmm_sweep_plugin"].LAYER1_PLANS) == 3
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["interrupted"] is True and record["status"] == "interrupted"
    m = record["metrics"]
    assert m["n_samples"] == 2 and len(m["samples"]) == 2 and m["interrupted"] is True
    assert "interrupted after 2 of 5 samples" in m["notes"]


def test_interrupt_before_anything_finished_says_so(capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_run, "_load_once", interrupt)  # Ctrl-C while the model loads
    code, out, err = run_cli([*TINY, "hydra.run.dir=run"], capsys)
    assert code == 130 and err.strip().splitlines() == ["kvpress-mm: interrupted; nothing was saved"]


def test_status_of_results_without_one():
    """result.json files from before the status field count as ok; the Markdown table shows status and
    error only when a point did not finish ok."""
    base = {"config": {"strategy": {"name": "h2o", "budget": 0.1}}, "metrics": {"score": 0.5}}
    rows = table_rows([base, {**base, "interrupted": True}])
    assert [r["status"] for r in rows] == ["ok", "interrupted"]
    header = lambda rows: [c.strip() for c in markdown_table(rows).splitlines()[0].split("|")]  # noqa: E731
    assert "status" in header(rows) and "error" in header(rows)
    assert "status" not in header(rows[:1]) and "error" not in header(rows[:1])
    failed = table_rows([{**base, "status": "failed", "error": "ValueError: a | b"}])
    assert "ValueError: a \\| b" in markdown_table(failed)  # a pipe does not split the cell
