"""Benchmark output: a Markdown table and a PNG plot of the ratios (`merge` combines several runs)."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [
    ("model", "model", "{}"),
    ("length", "tokens", "{}"),
    ("strategy", "strategy", "{}"),
    ("budget", "budget", "{}"),
    ("prefill_ratio", "prefill / sdpa", "{:.2f}"),
    ("decode_ratio", "decode / full", "{:.2f}"),
    ("kv_ratio", "KV after / before", "{:.2f}"),
    ("peak_memory_ratio", "peak mem / sdpa", "{:.2f}"),
    ("plain_prefill_seconds", "sdpa prefill s", "{:.3f}"),
]


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    return "-" if value is None else fmt.format(value)


def markdown_table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        lines.append("| " + " | ".join(_cell(r, key, fmt) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(records: list[dict], path: Path) -> None:
    Path(path).write_text(markdown_table(records))


def summary_table(records: list[dict], budget: float = 0.2, length: int | None = None) -> str:
    """Markdown: a row per strategy, for each (model, longest prompt measured for it, or the longest one
    not above `length`) the prefill ratio, the decode ratio and the peak-memory ratio at `budget` (the
    eager reference at its own budget)."""
    longest = {}
    for r in records:
        if length is None or r["length"] <= length or all(o["length"] > length for o in records
                                                         if o["model"] == r["model"]):
            longest[r["model"]] = max(longest.get(r["model"], 0), r["length"])
    cols = [(m, n) for m, n in longest.items()]
    pick = {}
    for r in records:
        if r["length"] == longest[r["model"]] and (r["budget"] == budget or r["strategy"] == "eager_reference"):
            pick[(r["strategy"], r["model"])] = r
    names = list(dict.fromkeys(r["strategy"] for r in records))
    head = ["strategy"] + [f"{m} @ {n}: {what}" for m, n in cols for what in ("prefill", "decode", "peak mem")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name]
        for m, _ in cols:
            r = pick.get((name, m), {})
            cells += [_cell(r, "prefill_ratio", "{:.2f}"), _cell(r, "decode_ratio", "{:.2f}"),
                      _cell(r, "peak_memory_ratio", "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plot(records: list[dict], path: Path) -> None:
    """Prefill and decode ratios against prompt length, one line per strategy (budget 0.2 where present)."""
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        rows = [r for r in records if r["model"] == model and r["budget"] in (0.2,)]
        for col, (key, title) in enumerate((("prefill_ratio", "prefill time / plain sdpa"),
                                            ("decode_ratio", "decode ms/token / full cache"))):
            ax = axes[row][col]
            for name in sorted({r["strategy"] for r in rows}):
                pts = sorted((r["length"], r[key]) for r in rows if r["strategy"] == name and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name, linewidth=1)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{model}: {title} (budget 0.2)")
            ax.set_xlabel("prompt tokens")
        axes[row][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(records: list[dict], out: Path, budget: float = 0.2, length: int | None = None) -> None:
    """bench.json, bench.md (every record), bench_summary.md and bench.png into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"records": records}, indent=1))
    write_markdown(records, out / "bench.md")
    if records:
        (out / "bench_summary.md").write_text(summary_table(records, budget, length))
    write_plot(records, out / "bench.png")


def merge(paths: list[str | Path]) -> list[dict]:
    """The records of several bench.json files; a later file's record replaces an earlier one's for the
    same (model, length, strategy, budget), so a rerun of some points overrides the first run."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["records"]:
            merged[(r["model"], r["length"], r["strategy"], r["budget"])] = r
    order = list(dict.fromkeys(r["model"] for r in merged.values()))
    return sorted(merged.values(), key=lambda r: (order.index(r["model"]), r["length"]))

