"""One report of several bench runs.

    python -m kvpress_mm.summarize_bench OUT BENCH_JSON [BENCH_JSON ...] [--length N]

Merges the records of several `kvpress-mm bench` runs (e.g. the short prompts of every model in one run,
8k on the tiny model in another) and writes what one run writes (bench.json, bench.md, bench_summary.md,
bench.png) into OUT; the summary table is printed too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .bench.report import merge, summary_table, write_reports


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvpress_mm.summarize_bench", description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for bench.json, bench.md, bench_summary.md, bench.png")
    p.add_argument("inputs", nargs="+", help="bench.json files of earlier runs")
    p.add_argument("--budget", type=float, default=0.2, help="budget of the summary table (default 0.2)")
    p.add_argument(
        "--length",
        type=int,
        default=None,
        help="summary at the longest prompt not above this (default: each model's longest)",
    )
    args = p.parse_args(argv)
    records = merge(args.inputs)
    if not records:
        p.error(f"no records in {', '.join(args.inputs)}")
    write_reports(records, Path(args.out), args.budget, args.length)
    print(summary_table(records, args.budget, args.length))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
