"""The benchmark runs end to end and writes its three outputs (numbers are checked by reading them, not timed)."""

import json

from kvpress_mm.bench import BenchSettings, run_benchmark
from kvpress_mm.bench.memory import peak_memory


def test_bench_smoke(tmp_path):
    settings = BenchSettings(
        models=["micro"], lengths=[96], strategies=["snapkv", "h2o"], budgets=[0.2], repeats=1,
        decode_tokens=3, output_dir=str(tmp_path),
    )
    records = run_benchmark(settings)
    names = [r["strategy"] for r in records]
    assert names == ["snapkv", "h2o", "eager_reference"]
    for r in records:
        assert r["prefill_ratio"] > 0 and abs(r["kv_ratio"] - 19 / 96) < 1e-9  # floor(0.2 * 96) slots
    assert all(r["decode_ratio"] > 0 for r in records[:2])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["records"]) == 3
    assert "prefill / sdpa" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_peak_memory_sees_a_large_allocation():
    import torch

    with peak_memory(torch.device("cpu")) as peak:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB
        del block
    assert peak["bytes"] >= 60 * 1024 * 1024
