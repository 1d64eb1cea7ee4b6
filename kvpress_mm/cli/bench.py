"""The `bench` command's job: run the benchmark matrix and print its Markdown table."""

from __future__ import annotations

import dataclasses

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kvpress_mm.bench import BenchSettings, run_benchmark
from kvpress_mm.bench.overhead import overhead_table, run_overhead
from kvpress_mm.bench.report import markdown_table

from . import errors


def run_bench(cfg: DictConfig) -> list[dict]:
    """Hydra task function: bench.json / bench.md / bench.png go to the output directory (mode=overhead:
    overhead.json / overhead.md)."""
    import kvpress_mm

    values = OmegaConf.to_container(cfg, resolve=True)
    fields = {f.name for f in dataclasses.fields(BenchSettings)}
    try:
        # every setting, the device included (kvpress_mm.devices, as for eval), before any model loads
        settings = BenchSettings(**{k: v for k, v in values.items() if k in fields})
    except ValueError as err:
        errors.fail(err)
    if settings.output_dir is None:
        settings.output_dir = HydraConfig.get().runtime.output_dir
    names = settings.overhead.strategies if settings.mode == "overhead" else settings.strategies
    unknown = [n for n in names if n not in kvpress_mm.list_strategies()]
    if unknown:
        key = "overhead.strategies" if settings.mode == "overhead" else "strategies"
        errors.fail(f"{key}: unknown {unknown}; choose from {kvpress_mm.list_strategies()}")
    if settings.mode == "overhead":
        errors.results_in(settings.output_dir, "overhead.json")
        try:
            result = run_overhead(
                settings.overhead, settings.device, settings.dtype, settings.threads, settings.output_dir
            )
        except ValueError as err:  # overhead.kvpress=on without kvpress
            errors.fail(err)
        print(overhead_table(result))
        print(f"results: {settings.output_dir}/overhead.json, overhead.md")
        return result["rows"]
    errors.results_in(settings.output_dir, "bench.json")  # rewritten after each (length, model)
    records = run_benchmark(settings)
    print(markdown_table(records))
    print(f"results: {settings.output_dir}/bench.json, bench.md, bench.png")
    return records
