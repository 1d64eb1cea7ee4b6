"""One command, several strategies and budgets on the same samples (`also`, `budgets`, shared prefills): a
record per point, one summary, one table with a line per strategy; bad values are one line, exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import run_cli

from kvpress_mm.eval import runner as runner_mod

TINY = ["model=tiny_llava", "task=fidelity", "task.n_samples=2", "task.max_new_tokens=3", "progress=false"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(runner_mod, "WARMUP_NEW_TOKENS", 0)


def test_also_and_budgets_write_a_record_per_point_and_one_table(capsys):
    args = [*TINY, "strategy=snapkv", "also=[h2o,full]", "budgets=[0.2,0.5]", "hydra.run.dir=run"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    records = {p.parent.name: json.loads(p.read_text()) for p in Path("run").rglob("result.json")}
    assert sorted(records) == ["full@None", "h2o@0.2", "h2o@0.5", "snapkv@0.2", "snapkv@0.5"]
    assert records["h2o@0.5"]["config"]["strategy"] == {"name": "h2o", "budget": 0.5}
    assert records["h2o@0.2"]["metrics"]["kept_fraction"] == pytest.approx(0.2, abs=0.03)
    assert records["full@None"]["metrics"]["kept_fraction"] == 1.0
    # every point saw the same samples and the same full cache
    full_preds = {tuple(r["full_prediction"] for r in rec["metrics"]["samples"]) for rec in records.values()}
    assert len(full_preds) == 1
    rows = Path("run/results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 5
    for label in ("snapkv @ 0.200", "snapkv @ 0.500", "h2o @ 0.200", "h2o @ 0.500", "| full "):
        assert label in out
    assert out.count("of the KV bytes") == 5
    assert "results.csv" in out


def test_a_single_strategy_keeps_one_result_json(capsys):
    code, out, err = run_cli([*TINY, "strategy=snapkv", "hydra.run.dir=run"], capsys)
    assert code == 0, err
    assert [p.relative_to("run").as_posix() for p in Path("run").rglob("result.json")] == ["result.json"]
    assert "The strategy keeps" in out


def test_also_takes_the_strategy_budget_and_the_shared_prefill_can_be_turned_off(capsys):
    args = [*TINY, "strategy=snapkv", "strategy.budget=0.3", "also=[streaming_llm]", "share_prefill=false"]
    code, out, err = run_cli([*args, "hydra.run.dir=run"], capsys)
    assert code == 0, err
    record = json.loads(next(Path("run").rglob("streaming_llm*/result.json")).read_text())
    assert record["config"]["strategy"]["budget"] == 0.3
    assert "share_prefill" not in record["metrics"]["notes"]


@pytest.mark.parametrize(
    ("override", "key"),
    [("also=[snap]", "also"), ("budgets=[0.2,1.5]", "budgets"), ("budgets=[0]", "budgets")],
)
def test_bad_also_or_budgets_is_one_line_before_any_model_loads(capsys, monkeypatch, override, key):
    import kvpress_mm.eval

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(kvpress_mm.eval, "load_model", no_load)
    code, _, err = run_cli([*TINY, override, "hydra.run.dir=run"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{key}:" in lines[0]
    assert not Path("run").exists()
