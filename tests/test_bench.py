"""The benchmark runs end to end and writes its three outputs (numbers are checked by reading them, not timed)."""

import json

import pytest

from kvpress_mm.bench import BenchSettings, run_benchmark
from kvpress_mm.bench.memory import peak_memory


def test_bench_smoke(tmp_path):
    settings = BenchSettings(
        models=["micro"],
        lengths=[96],
        strategies=["snapkv", "h2o"],
        budgets=[0.2],
        repeats=1,
        decode_tokens=3,
        output_dir=str(tmp_path),
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
    summary = (tmp_path / "bench_summary.md").read_text().splitlines()
    assert summary[0].startswith("| strategy | micro @ 96: prefill | micro @ 96: decode | micro @ 96: peak mem |")
    assert [line.split(" | ")[0] for line in summary[2:]] == ["| snapkv", "| h2o", "| eager_reference"]
    assert summary[-1].split(" | ")[2] == "-"  # the eager reference is not decoded


def test_peak_memory_sees_a_large_allocation():
    import torch

    with peak_memory(torch.device("cpu")) as peak:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB
        del block
    assert peak["bytes"] >= 60 * 1024 * 1024


def test_rounds_share_plain_runs_between_neighbours(monkeypatch):
    from kvpress_mm.bench import runner

    calls = []

    def fake_run(bench, inputs, point, settings, device):
        calls.append(point.name if point is not None else "plain")
        t = float(len(calls))  # the run's "time" is its position in the sequence
        return t, 10 * t, None if point is not None and point.eager else t, None

    monkeypatch.setattr(runner, "_run", fake_run)
    settings = BenchSettings(repeats=3, plain_every=2, decode_tokens=4)
    points = [runner.Point(n, 0.2, None) for n in "abcde"] + [runner.Point("eager", 0.2, None, eager=True)]
    runner.measure_rounds(None, None, points, settings, None)
    # round: plain, 2 points, plain, 2 points, plain, 2 points, plain
    assert len(calls) == 3 * (6 + 4)
    rounds = [calls[i * 10 : (i + 1) * 10] for i in range(3)]
    for r in rounds:
        assert r[0] == r[3] == r[6] == r[9] == "plain" and sorted(x for x in r if x != "plain") == sorted("abcde") + [
            "eager"
        ]
    assert len({tuple(r) for r in rounds}) == 3  # the order changes from round to round
    for p in points:
        assert len(p.runs) == len(p.plain) == 3
        for (t, _mem, dec), (pt, pmem, pdec) in zip(p.runs, p.plain):
            i = int(t) - 1  # position of the point's run; its neighbours are the plain runs around its group
            prev = max(j for j in range(i) if calls[j] == "plain")
            nxt = min(j for j in range(i, len(calls)) if calls[j] == "plain")
            assert pt == (prev + 1 + nxt + 1) / 2 and pmem == 10 * pt
            assert (dec is None) == p.eager and pdec == pt
    record = runner.record_of(points[0])
    assert record["prefill_ratio"] == pytest.approx(
        sorted(r[0] for r in points[0].runs)[1] / sorted(r[0] for r in points[0].plain)[1]
    )
    assert "decode_ratio" in record and "decode_ratio" not in runner.record_of(points[-1])
    with pytest.raises(ValueError, match="plain_every"):
        BenchSettings(plain_every=0)


def _record(model, length, strategy, prefill):
    return {
        "model": model,
        "length": length,
        "strategy": strategy,
        "budget": 0.2,
        "prefill_ratio": prefill,
        "decode_ratio": 0.5,
        "kv_ratio": 0.2,
        "peak_memory_ratio": 0.7,
        "plain_prefill_seconds": 1.0,
    }


def test_report_merges_runs_and_picks_the_summary_length(tmp_path):
    from kvpress_mm import summarize_bench
    from kvpress_mm.bench import report

    first = tmp_path / "a.json"
    first.write_text(
        json.dumps(
            {
                "records": [
                    _record("tiny", 1024, "h2o", 1.5),
                    _record("tiny", 4096, "h2o", 1.4),
                    _record("mid", 1024, "h2o", 1.2),
                ]
            }
        )
    )
    second = tmp_path / "b.json"
    second.write_text(json.dumps({"records": [_record("tiny", 4096, "h2o", 1.3), _record("tiny", 8192, "h2o", 1.25)]}))
    assert summarize_bench.main([str(tmp_path / "out"), str(first), str(second), "--length", "4096"]) == 0
    merged = json.loads((tmp_path / "out" / "bench.json").read_text())["records"]
    assert [(r["model"], r["length"]) for r in merged] == [
        ("tiny", 1024),
        ("tiny", 4096),
        ("tiny", 8192),
        ("mid", 1024),
    ]
    assert [r["prefill_ratio"] for r in merged if r["length"] == 4096] == [1.3]  # the later run wins
    summary = (tmp_path / "out" / "bench_summary.md").read_text().splitlines()
    # tiny at 4096 (8192 is above --length), mid at its longest, 1024
    assert summary[0] == (
        "| strategy | tiny @ 4096: prefill | tiny @ 4096: decode | tiny @ 4096: peak mem | "
        "mid @ 1024: prefill | mid @ 1024: decode | mid @ 1024: peak mem |"
    )
    assert summary[2].startswith("| h2o | 1.30 | 0.50 | 0.70 | 1.20 |")
    assert "tiny @ 8192" in report.summary_table(merged)
    assert "machine" not in report.markdown_table(merged)
    merged[0]["machine"] = "AMD EPYC, AVX2"
    assert report.markdown_table(merged).splitlines()[0].endswith("| machine |")
    assert (tmp_path / "out" / "bench.png").stat().st_size > 1000


def test_runs_in_two_dtypes_stay_two_series(tmp_path):
    """mid in float32 (a record from before records carried their dtype: its run's settings say it) and
    mid in bfloat16 on a GPU: merged side by side, a dtype column, a summary column group per series."""
    from kvpress_mm.bench import report

    fp32 = tmp_path / "fp32.json"
    fp32.write_text(json.dumps({"settings": {"dtype": "float32"}, "records": [_record("mid", 4096, "h2o", 1.1)]}))
    bf16 = tmp_path / "bf16.json"
    bf16.write_text(
        json.dumps(
            {
                "records": [
                    {
                        **_record("mid", 4096, "h2o", 2.8),
                        "dtype": "bfloat16",
                        "device": "cuda",
                        "machine": "NVIDIA H200",
                    }
                ]
            }
        )
    )
    merged = report.merge([fp32, bf16])
    assert [(r["dtype"], r["prefill_ratio"]) for r in merged] == [("float32", 1.1), ("bfloat16", 2.8)]
    assert report.series_labels(merged) == ["mid float32 cpu", "mid bfloat16 cuda"]
    assert "| dtype |" in report.markdown_table(merged).splitlines()[0]
    summary = report.summary_table(merged)
    assert "mid float32 cpu @ 4096: prefill" in summary and "mid bfloat16 cuda @ 4096: prefill" in summary
    assert summary.splitlines()[2].startswith("| h2o | 1.10 | 0.50 | 0.70 | 2.80 |")
    report.write_plot(merged, tmp_path / "two.png")
    assert (tmp_path / "two.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("models", ["tiny", "large"], ["'large'", "tiny", "mid", "mini_llava"]),
        ("lengths", [1024, 0], ["lengths", "0", ">= 16"]),
        ("budgets", [0.2, 1.5], ["budgets", "1.5", "(0, 1]"]),
        ("dtype", "float64", ["'float64'", "float32", "bfloat16", "float16"]),
        ("device", "tpu", ["'tpu'", "cpu", "cuda"]),
        ("device", "not a device", ["'not a device'"]),
        ("decode_tokens", -1, ["decode_tokens", "-1"]),
        ("batch", 0, ["batch", "0", ">= 1"]),
        ("padding", 1.0, ["padding", "1.0", "[0, 1)"]),
    ],
)
def test_bad_settings_name_the_value_and_the_allowed_ones(field, value, named):
    with pytest.raises(ValueError) as err:
        BenchSettings(**{field: value})
    for text in named:
        assert text in str(err.value)


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda'.*sees no CUDA device; use device=cpu"):
        BenchSettings(device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    BenchSettings(device="cuda:1")
    with pytest.raises(ValueError, match="'cuda:2'.*cuda:0..cuda:1"):
        BenchSettings(device="cuda:2")


def test_padded_batch_bench(tmp_path):
    """batch=3, padding=0.5: rows padded by 0, 1/4 and 1/2 of the prompt; every row keeps floor(0.25 * its
    real tokens) and decoding continues the padded batch."""
    settings = BenchSettings(
        models=["micro"],
        lengths=[96],
        strategies=["h2o"],
        budgets=[0.25],
        repeats=1,
        decode_tokens=2,
        batch=3,
        padding=0.5,
        eager_reference=False,
        output_dir=str(tmp_path),
    )
    [record] = run_benchmark(settings)
    assert record["batch"] == 3 and record["padding"] == 0.5 and record["decode_ratio"] > 0
    assert record["machine"]  # the CPU model (and its vector unit) the numbers belong to
    # the cache is as long as its largest row: floor(0.25 * 96) slots of the unpadded first row
    assert record["kv_ratio"] == pytest.approx(24 / 96)
    table = (tmp_path / "bench.md").read_text().splitlines()
    assert table[0].startswith("| model | tokens | batch | padding | strategy |") and "| 3 | 0.5 | h2o |" in table[2]
    with pytest.raises(ValueError, match="needs batch >= 2"):
        BenchSettings(padding=0.2)
    with pytest.raises(ValueError, match="mini_llava runs with batch=1 only"):
        BenchSettings(models=["tiny", "mini_llava"], batch=2)


def test_default_strategy_list_skips_what_the_model_cannot_run(tmp_path, capsys):
    """Every registered strategy by default; sparsemm (no head profile for a random model) is skipped with a line,
    and named explicitly it is an error naming the strategy and the model."""
    import kvpress_mm

    settings = BenchSettings(
        models=["micro"],
        lengths=[48],
        budgets=[0.2],
        repeats=1,
        decode_tokens=1,
        eager_reference=False,
        output_dir=str(tmp_path),
    )
    names = {r["strategy"] for r in run_benchmark(settings)}
    assert "sparsemm" not in names and {"snapkv", "h2o", "look_m"} <= names
    assert names == set(kvpress_mm.list_strategies()) - {"full", "sparsemm"}
    assert "skipping sparsemm on micro" in capsys.readouterr().out
    with pytest.raises(ValueError, match="bench: strategy 'sparsemm' cannot run on micro"):
        run_benchmark(BenchSettings(**{**settings.__dict__, "strategies": ["sparsemm"]}))
