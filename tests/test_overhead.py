"""`kvpress-mm bench mode=overhead`: the framework's cost per layer against plain prefill, its host reads, and
kvpress beside it when installed (numbers are checked by reading them, not timed)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from kvpress_mm.bench import BenchSettings
from kvpress_mm.bench.overhead import HostReadCounter, OverheadSettings, run_overhead

MICRO = dict(model="micro", length=48, pairs=2, warmup=0)


def test_overhead_mode_writes_rows_reads_and_a_table(tmp_path):
    settings = OverheadSettings(**MICRO, strategies=["streaming_llm", "h2o"], kvpress="off")
    result = run_overhead(settings, output_dir=str(tmp_path), progress=False)
    rows = result["rows"]
    assert [(r["strategy"], r["library"]) for r in rows] == [("streaming_llm", "kvpress_mm"), ("h2o", "kvpress_mm")]
    for r in rows:
        assert r["pairs"] == 2 and r["plain_prefill_ms"] > 0 and r["reads_per_layer"] == 0
        assert r["ms_per_layer_q1"] <= r["ms_per_layer"] <= r["ms_per_layer_q3"]
        assert 0 <= r["reads_per_prompt"] <= 6
    assert result["layers"] == 2 and result["clock"] == "thread" and result["kvpress"].startswith("off")
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert saved["rows"] == rows
    table = (tmp_path / "overhead.md").read_text()
    assert table.startswith("| strategy | kvpress-mm ms/layer | kvpress ms/layer |")
    assert "| streaming_llm |" in table and "| h2o |" in table


_WITH_KVPRESS = """
import json, sys
from kvpress_mm.bench.overhead import OverheadSettings, overhead_table, run_overhead
settings = OverheadSettings(model="micro", length=80, pairs=2, warmup=0, kvpress="on",
                            strategies=["streaming_llm", "knorm", "snapkv", "h2o"])
result = run_overhead(settings, output_dir=None, progress=False)
print(json.dumps({"result": result, "table": overhead_table(result)}))
"""


def test_kvpress_beside_ours_when_installed():
    """In a child process: importing kvpress patches transformers' attention functions for the whole process."""
    if importlib.util.find_spec("kvpress") is None:
        pytest.skip("kvpress is not installed here; CI runs without the compare extra")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.run([sys.executable, "-c", _WITH_KVPRESS], capture_output=True, text=True, env=env)
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.strip().splitlines()[-1])
    result = out["result"]
    theirs = {r["strategy"]: r for r in result["rows"] if r["library"] == "kvpress"}
    assert sorted(theirs) == ["knorm", "snapkv", "streaming_llm"]  # no sdpa H2O press there
    assert theirs["streaming_llm"]["reads_per_layer"] == 1  # its prefill check reads cache_position
    assert result["kvpress"].startswith("kvpress 0.")
    lines = out["table"].splitlines()
    assert lines[0].startswith("| strategy | kvpress-mm ms/layer | kvpress ms/layer |")
    h2o = next(line for line in lines if line.startswith("| h2o |"))
    assert h2o.split(" | ")[2] == "-"  # ours only


def test_kvpress_on_without_kvpress_is_an_error(monkeypatch):
    from kvpress_mm.bench import overhead

    monkeypatch.setattr(overhead, "kvpress_module", lambda: "ImportError: no kvpress")
    with pytest.raises(ValueError, match="overhead.kvpress=on"):
        overhead.contenders(OverheadSettings(**MICRO, kvpress="on"))
    entries, note = overhead.contenders(OverheadSettings(**MICRO, kvpress="auto"))
    assert {e.library for e in entries} == {"kvpress_mm"} and "not importable" in note


def test_host_read_counter_sees_reads_and_data_sized_ops():
    x = torch.arange(6.0)
    counter = HostReadCounter()
    with counter:
        x.sum().item()
        bool(x.any())
        x.tolist()
        x.nonzero()
        _ = x[x > 2]
        x[x > 4] = 0.0
        int(x[1])
        x + 1  # not a read
    assert counter.counts == {
        "item": 1,
        "__bool__": 1,
        "tolist": 1,
        "nonzero": 1,
        "__getitem__[bool]": 1,
        "__setitem__[bool]": 1,
        "__int__": 1,
    }
    assert counter.total == 7


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("model", "huge", ["'huge'", "narrow", "micro"]),
        ("kvpress", "maybe", ["'maybe'", "auto", "on", "off"]),
        ("clock", "sundial", ["'sundial'", "wall", "thread"]),
        ("pairs", 0, ["overhead.pairs", "0"]),
        ("strategies", [], ["overhead.strategies"]),
    ],
)
def test_bad_overhead_settings_name_the_value(field, value, named):
    with pytest.raises(ValueError) as err:
        OverheadSettings(**{field: value})
    assert all(n in str(err.value) for n in named), str(err.value)


def test_bench_settings_take_the_overhead_section():
    settings = BenchSettings(mode="overhead", overhead={"model": "micro", "pairs": 3})
    assert isinstance(settings.overhead, OverheadSettings) and settings.overhead.pairs == 3
    with pytest.raises(ValueError, match="mode"):
        BenchSettings(mode="fast")


def test_overhead_command(tmp_path):
    args = [
        "bench",
        "mode=overhead",
        "overhead.model=micro",
        "overhead.length=48",
        "overhead.pairs=1",
        "overhead.warmup=0",
        "overhead.strategies=[streaming_llm]",
        "overhead.kvpress=off",
        "overhead.host_reads=false",
        f"hydra.run.dir={tmp_path / 'o'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "kvpress_mm.cli", *args], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "o" / "overhead.json").read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["streaming_llm"] and "reads_per_layer" not in rows[0]
    assert "| streaming_llm |" in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "kvpress_mm.cli", "bench", "mode=overhead", "overhead.strategies=[nope]"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "overhead.strategies: unknown ['nope']" in bad.stderr
