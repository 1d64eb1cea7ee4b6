"""Benchmark output: a Markdown table and a PNG plot of the ratios."""

from __future__ import annotations

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
