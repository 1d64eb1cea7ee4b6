"""Performance benchmark: prefill overhead, decode speed, KV bytes and peak memory of every strategy."""

from .runner import BenchSettings, run_benchmark

__all__ = ["BenchSettings", "run_benchmark"]
