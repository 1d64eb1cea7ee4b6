"""`python -m kvpress_mm.summarize OUT_DIR SWEEP_DIR [SWEEP_DIR ...]`: one summary of several sweeps.

Writes results.csv, results.md, scores.md (strategy x budget per task) and score_vs_budget.png (one panel
per model / task) into OUT_DIR from every result.json under the sweep directories, e.g. to combine a sweep
over the text tasks with one over the image tasks, or a sweep with a later one of a strategy variant.
"""

from __future__ import annotations

import argparse

from .results import write_sweep_summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvpress_mm.summarize", description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for the summary files")
    p.add_argument("sweeps", nargs="+", help="sweep directories (searched for result.json at any depth)")
    p.add_argument("--result-file", default="result.json")
    args = p.parse_args(argv)
    written = write_sweep_summary(args.out, args.result_file, sources=args.sweeps)
    if not written:
        p.error(f"no {args.result_file} under {', '.join(args.sweeps)}")
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
