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


def series_labels(records: list[dict]) -> list[str]:
    """A label per record for its series: the model, with the dtype and the device when merged runs differ
    in them (mid in float32 and in bfloat16 are two series)."""
    defaults = {"model": None, "dtype": "float32", "device": "cpu"}
    parts = ["model"] + [k for k in ("dtype", "device") if len({r.get(k, defaults[k]) for r in records}) > 1]
    return [" ".join(str(r.get(k, defaults[k])) for k in parts) for r in records]


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    return "-" if value is None else fmt.format(value)


def markdown_table(records: list[dict]) -> str:
    columns = COLUMNS
    if any(r.get("batch", 1) != 1 for r in records):  # padded-batch runs say so
        columns = [*COLUMNS[:2], ("batch", "batch", "{}"), ("padding", "padding", "{}"), *COLUMNS[2:]]
    if len({r.get("dtype") for r in records}) > 1:
        columns = [*columns[:2], ("dtype", "dtype", "{}"), *columns[2:]]
    if len({r.get("machine") for r in records}) > 1:  # merged runs from several machines
        columns = [*columns, ("machine", "machine", "{}")]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        lines.append("| " + " | ".join(_cell(r, key, fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(records: list[dict], path: Path) -> None:
    Path(path).write_text(markdown_table(records))


def summary_table(records: list[dict], budget: float = 0.2, length: int | None = None) -> str:
    """Markdown: a row per strategy, for each (model, longest prompt measured for it, or the longest one
    not above `length`) the prefill ratio, the decode ratio and the peak-memory ratio at `budget` (the
    eager reference at its own budget)."""
    series = dict(zip(map(id, records), series_labels(records)))
    longest = {}
    for r in records:
        m = series[id(r)]
        if length is None or r["length"] <= length or all(o["length"] > length for o in records if series[id(o)] == m):
            longest[m] = max(longest.get(m, 0), r["length"])
    cols = [(m, n) for m, n in longest.items()]
    pick = {}
    for r in records:
        m = series[id(r)]
        if r["length"] == longest.get(m) and (r["budget"] == budget or r["strategy"] == "eager_reference"):
            pick[(r["strategy"], m)] = r
    names = list(dict.fromkeys(r["strategy"] for r in records))
    head = ["strategy"] + [f"{m} @ {n}: {what}" for m, n in cols for what in ("prefill", "decode", "peak mem")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name]
        for m, _ in cols:
            r = pick.get((name, m), {})
            cells += [
                _cell(r, "prefill_ratio", "{:.2f}"),
                _cell(r, "decode_ratio", "{:.2f}"),
                _cell(r, "peak_memory_ratio", "{:.2f}"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PANELS = (
    ("prefill_ratio", "prefill time / plain sdpa", True),
    ("decode_ratio", "decode ms/token / full cache", False),
    ("peak_memory_ratio", "peak prefill memory / plain sdpa", True),
)


def _styles(names: list[str]) -> dict:
    """A distinct (colour, marker, line style) per strategy: 18 lines do not fit one 10-colour cycle."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors
    markers = "osD^vP*Xh<>p"
    return {
        name: dict(
            color=colours[i % len(colours)],
            marker=markers[i % len(markers)],
            linestyle="--" if name == "eager_reference" else ("-" if i % 2 == 0 else ":"),
        )
        for i, name in enumerate(names)
    }


def write_plot(records: list[dict], path: Path, budget: float = 0.2) -> None:
    """Prefill, decode and peak-memory ratios against prompt length, a row per model, a line per strategy
    at `budget` (the eager reference at its own). Prefill and memory use a log axis, so the ~1.0-1.3x
    strategies stay readable beside the eager reference's several-fold cost."""
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    labels_of = series_labels(records)
    models = list(dict.fromkeys(labels_of))
    names = sorted({r["strategy"] for r in records})
    styles = _styles(names)
    fig, axes = plt.subplots(len(models), len(PANELS), figsize=(15, 3.8 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        rows = [
            r
            for r, label in zip(records, labels_of)
            if label == model and (r["budget"] == budget or r["strategy"] == "eager_reference")
        ]
        for col, (key, title, log) in enumerate(PANELS):
            ax = axes[row][col]
            for name in names:
                pts = sorted((r["length"], r[key]) for r in rows if r["strategy"] == name and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), label=name, linewidth=1, markersize=4, **styles[name])
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            if log:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
                ax.tick_params(axis="y", which="minor", labelsize=6)
            ax.set_title(f"{model}: {title} (budget {budget})", fontsize=9)
            ax.set_xlabel("prompt tokens")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0.03 + 0.012 * ((len(labels) + 5) // 6), 1, 1))
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
    write_plot(records, out / "bench.png", budget)


def merge(paths: list[str | Path]) -> list[dict]:
    """The records of several bench.json files; a later file's record replaces an earlier one's for the
    same (model, dtype, device, length, strategy, budget, batch, padding), so a rerun of some points
    overrides the first run. Records written before they carried their dtype take their run's."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        run = json.loads(Path(path).read_text())
        for r in run["records"]:
            r.setdefault("dtype", run.get("settings", {}).get("dtype", "float32"))
            key = (
                r["model"],
                r["dtype"],
                r.get("device", "cpu"),
                r["length"],
                r["strategy"],
                r["budget"],
                r.get("batch", 1),
                r.get("padding", 0.0),
            )
            merged[key] = r
    order = list(dict.fromkeys(r["model"] for r in merged.values()))
    return sorted(merged.values(), key=lambda r: (order.index(r["model"]), r["length"]))
