"""Runs the benchmark matrix: every (model, prompt length, strategy, budget) against plain sdpa.

Runs alternate between the strategy and the plain baseline inside one process, each repeated, and
the medians give the ratios. Threads are pinned so the numbers compare across runs of a machine.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import kvpress_mm

from .measure import decode_ms_per_token, prefill
from .models import load_bench_model
from .report import write_markdown, write_plot

EAGER_REFERENCE = "eager_reference"


@dataclass
class BenchSettings:
    models: list[str] = field(default_factory=lambda: ["tiny", "mid", "mini_llava"])
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    strategies: list[str] = field(default_factory=list)  # empty: every registered strategy
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.2])
    repeats: int = 3
    decode_tokens: int = 16
    threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    eager_reference: bool = True
    eager_max_length: int = 4096  # the L x L reference needs ~heads * L^2 * 4 bytes per layer
    output_dir: str | None = "."


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _measure_pair(bench, inputs, strategy, settings, device, eager=False) -> dict:
    """Alternate plain and strategy runs; return medians of both and their ratios."""
    plain, comp = {"t": [], "mem": [], "dec": []}, {"t": [], "mem": [], "dec": []}
    report = None
    for rep in range(settings.repeats):
        order = (False, True) if rep % 2 == 0 else (True, False)
        for use_strategy in order:
            run = prefill(bench, inputs, strategy if use_strategy else None, device, eager=eager and use_strategy)
            bucket = comp if use_strategy else plain
            bucket["t"].append(run.seconds)
            bucket["mem"].append(run.peak_bytes)
            if settings.decode_tokens and not eager:
                bucket["dec"].append(decode_ms_per_token(bench, run, settings.decode_tokens, device))
            if use_strategy:
                report = run.report
    record = {
        "prefill_seconds": _median(comp["t"]),
        "plain_prefill_seconds": _median(plain["t"]),
        "prefill_ratio": _median(comp["t"]) / _median(plain["t"]),
        "peak_bytes": _median(comp["mem"]),
        "plain_peak_bytes": _median(plain["mem"]),
        # a floor of 1 MiB keeps tiny prompts (whose plain peak is ~0) from giving absurd ratios
        "peak_memory_ratio": _median(comp["mem"]) / max(2.0**20, _median(plain["mem"])),
    }
    if comp["dec"]:
        record.update(
            decode_ms_per_token=_median(comp["dec"]),
            full_decode_ms_per_token=_median(plain["dec"]),
            decode_ratio=_median(comp["dec"]) / _median(plain["dec"]),
        )
    if report is not None and report.before_bytes:
        record.update(
            kv_bytes_before=report.before_bytes,
            kv_bytes_after=report.after_bytes,
            kv_ratio=report.after_bytes / report.before_bytes,
        )
    return record


def run_benchmark(settings: BenchSettings) -> list[dict]:
    """Measure the matrix of `settings`; writes bench.json, bench.md and bench.png to output_dir."""
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    dtype = getattr(torch, settings.dtype)
    names = settings.strategies or [n for n in kvpress_mm.list_strategies() if n != "full"]
    records = []
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = [(m, n) for m in settings.models for n in settings.lengths]
    with tqdm(total=len(points) * (len(names) * len(settings.budgets) + settings.eager_reference), desc="bench") as bar:
        for model_name in settings.models:
            try:
                bench = load_bench_model(model_name, device, dtype)
            except (ImportError, FileNotFoundError, OSError) as err:
                tqdm.write(f"skipping {model_name}: {err}")
                bar.update(len(settings.lengths) * (len(names) * len(settings.budgets) + settings.eager_reference))
                continue
            for length in settings.lengths:
                inputs = bench.make_inputs(length)
                prompt = int(inputs["input_ids"].shape[1])
                prefill(bench, inputs, None, device)  # warm-up
                base = {"model": model_name, "length": prompt, "device": str(device), "threads": settings.threads}
                for name in names:
                    for budget in settings.budgets:
                        strategy = kvpress_mm.get_strategy(name, budget=budget)
                        record = _measure_pair(bench, inputs, strategy, settings, device)
                        records.append({**base, "strategy": name, "budget": budget, **record})
                        bar.update()
                if settings.eager_reference:
                    if prompt <= settings.eager_max_length:
                        strategy = kvpress_mm.get_strategy("h2o", budget=0.2)
                        record = _measure_pair(bench, inputs, strategy, settings, device, eager=True)
                        records.append({**base, "strategy": EAGER_REFERENCE, "budget": 0.2, **record})
                    bar.update()
                (out / "bench.json").write_text(json.dumps({"settings": asdict(settings), "records": records}, indent=1))
    write_markdown(records, out / "bench.md")
    write_plot(records, out / "bench.png")
    return records
