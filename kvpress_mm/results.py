"""Run results on disk: one JSON per run, and for a sweep one table (CSV + Markdown) and a score-vs-budget plot.

The JSON of a run (written by the CLI into its Hydra output directory) holds:
    config       the resolved config (strategy, model, task, run options)
    choices      which config-group options were selected (strategy=..., model=..., task=...)
    overrides    the command-line overrides of this run / sweep point
    metrics      RunResult.to_dict() of kvpress_mm.eval.evaluate (scores, cache sizes, timings, samples)
    cache        KV bytes before / after compression and the kept fraction (copied from metrics)
    timings      seconds to load the model, to evaluate, in all; prefill seconds, decode tokens/s
    environment  versions (python, torch, transformers, hydra, kvpress-mm), device, threads, host
    status       ok / interrupted (the samples finished before a Ctrl-C; "interrupted": true) / failed (a
                 sweep point that raised: "error" holds its one-line text; no metrics)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .validate import is_number

MIB = 1024 * 1024

# the sweep table: (column, header, how to read it from a run's JSON)
TABLE_COLUMNS = (
    "job",
    "strategy",
    "budget",
    "model",
    "task",
    "protocol",
    "n_samples",
    "score",
    "score_ci",
    "score_low",
    "score_high",
    "full_score",
    "vs_full",
    "gold_logprob_drop",
    "gold_kl",
    "kept_fraction",
    "kv_mib_before",
    "kv_mib_after",
    "prefill_s",
    "decode_tok_s",
    "peak_mib",
    "status",
    "error",
    "overrides",
    "output_dir",
)
STATUS_COLUMNS = ("status", "error")  # left out of a Markdown table whose every row is ok
CSV_ONLY_COLUMNS = ("score_low", "score_high")  # the Markdown table shows them as score_ci
ERROR_WIDTH = 160  # characters of an error shown in a Markdown table (results.csv keeps all of it)


# ============================================================================ one run


def environment(device: Any = None) -> dict:
    """Versions and the device a run used (enough to tell two result files' setups apart)."""
    import torch

    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
        "versions": {name: _version(name) for name in ("kvpress-mm", "torch", "transformers", "hydra-core")},
        "device": dev,
        "torch_threads": torch.get_num_threads(),
    }
    if dev.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(dev).index or 0
        info["device_name"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def run_record(
    *, config: dict, choices: dict, overrides: list, metrics: dict, timings: dict, device: Any, job: dict
) -> dict:
    """The JSON document of one run (see the module docstring)."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "job": job,
        "config": config,
        "choices": choices,
        "overrides": overrides,
        "cache": {k: metrics.get(k) for k in ("kv_bytes_before", "kv_bytes_after", "kept_fraction")},
        "timings": {
            **timings,
            "prefill_seconds": metrics.get("prefill_seconds"),
            "decode_tokens_per_second": metrics.get("decode_tokens_per_second"),
        },
        "metrics": metrics,
        "environment": environment(device),
    }


def write_json(path: str | Path, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomic(path, json.dumps(record, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        return item()
    return repr(obj)


def comparison_rows(*records: dict) -> list[dict]:
    """A row per run's strategy (score, kept, KV MiB, speed) and, when the runs compared, one full-cache row
    (the runs of one command share their samples and their full cache)."""
    rows = []
    for record in records:
        m = record["metrics"]
        rows.append(
            {
                "run": strategy_label(record)
                + (f" @ {_budget_text(record['config']['strategy'])}" if len(records) > 1 else ""),
                "score": m.get("score"),
                "score_ci": interval_text(m.get("score_ci")),
                "kept": m.get("kept_fraction"),
                "kv_mib_before": _mib(m.get("kv_bytes_before")),
                "kv_mib_after": _mib(m.get("kv_bytes_after")),
                "prefill_s": m.get("prefill_seconds"),
                "decode_tok_s": m.get("decode_tokens_per_second"),
            }
        )
    m = records[0]["metrics"]
    before = m.get("kv_bytes_before")
    full = m.get("full") if isinstance(m.get("full"), dict) else {}
    if m.get("full_score") is not None or full:

        def get(key):  # the runner reports the full cache either as metrics["full"][key] or metrics["full_<key>"]
            return full.get(key, m.get(f"full_{key}"))

        full_before = get("kv_bytes_before") if get("kv_bytes_before") is not None else before
        full_after = get("kv_bytes_after") if get("kv_bytes_after") is not None else full_before
        rows.append(
            {
                "run": "full",
                "score": get("score"),
                "score_ci": interval_text(get("score_ci")),
                "kept": get("kept_fraction") if get("kept_fraction") is not None else 1.0,
                "kv_mib_before": _mib(full_before),
                "kv_mib_after": _mib(full_after),
                "prefill_s": get("prefill_seconds"),
                "decode_tok_s": get("decode_tokens_per_second"),
            }
        )
    return rows


def comparison_table(*records: dict) -> str:
    """A Markdown table of comparison_rows, with the runs' model / task / budget as a caption and a line per
    strategy saying what its numbers mean."""
    record = records[0]
    cfg = record.get("config", {})
    budgets = sorted({_budget_text(r.get("config", {}).get("strategy", {})) for r in records})
    caption = (
        f"model={record.get('choices', {}).get('model', _get(cfg, 'model.name'))} "
        f"task={_get(cfg, 'task.name')} protocol={record['metrics'].get('protocol', 'question_aware')} "
        f"n_samples={record['metrics'].get('n_samples')} "
        f"budget={', '.join(budgets)}"
    )
    headers = ["run", "score", "95% CI", "kept", "KV MiB before", "KV MiB after", "prefill s", "decode tok/s"]
    keys = ["run", "score", "score_ci", "kept", "kv_mib_before", "kv_mib_after", "prefill_s", "decode_tok_s"]
    body = [[_fmt(row[k]) for k in keys] for row in comparison_rows(*records)]
    lines = [_meaning(r, strategy_label(r) if len(records) > 1 else "The strategy") for r in records]
    text = "".join(f"\n{line}" for line in lines if line)
    return caption + "\n\n" + _markdown(headers, body) + ("\n" + text if text else "")


def _meaning(record: dict, who: str = "The strategy") -> str:
    """One line saying what the numbers mean: the memory saved and whether the score differs from the full
    cache's on the same samples."""
    m = record["metrics"]
    before, after = m.get("kv_bytes_before"), m.get("kv_bytes_after")
    cmp = m.get("vs_full")
    if not before or after is None or not cmp:
        return ""
    saved = 1 - after / before
    verdict = (
        f"differs from the full cache's by {cmp['diff']:+.2f} (significant at 5%"
        + (f", McNemar p={cmp['p']:.2g}" if cmp.get("p") is not None else "")
        + ")"
        if cmp["significant"]
        else f"is not distinguishable from the full cache's on these {cmp['n']} samples (difference "
        f"{cmp['diff']:+.2f}" + (f", p={cmp['p']:.2g}" if cmp.get("p") is not None else "") + ")"
    )
    return f"{who} keeps {1 - saved:.0%} of the KV bytes ({saved:.0%} saved); its score {verdict}."


# ============================================================================ a sweep


def collect(sweep_dir: str | Path, result_file: str = "result.json", newer_than: float | None = None) -> list[dict]:
    """Run JSONs under `sweep_dir` (any depth), ordered by job number; `newer_than`: mtime cut-off."""
    records = []
    for path in Path(sweep_dir).rglob(result_file):
        if newer_than is not None and path.stat().st_mtime < newer_than:
            continue  # left by an earlier sweep into the same folder
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        record.setdefault("job", {})["output_dir"] = str(path.parent)
        records.append(record)
    return sorted(records, key=lambda r: (_num(r.get("job", {}).get("num")), r["job"]["output_dir"]))


def table_rows(records: Iterable[dict]) -> list[dict]:
    """One flat row per run, columns TABLE_COLUMNS."""
    rows = []
    for r in records:
        m, cfg = r.get("metrics", {}), r.get("config", {})
        strategy = cfg.get("strategy", {})
        rows.append(
            {
                "job": r.get("job", {}).get("num"),
                "strategy": strategy_label(r),
                "budget": _budget_value(strategy),
                "model": r.get("choices", {}).get("model") or _get(cfg, "model.name"),
                "task": _get(cfg, "task.name"),
                "protocol": m.get("protocol") or cfg.get("protocol") or "question_aware",
                "n_samples": m.get("n_samples"),
                "score": m.get("score"),
                "score_ci": interval_text(m.get("score_ci")),
                "score_low": (m.get("score_ci") or (None, None))[0],
                "score_high": (m.get("score_ci") or (None, None))[1],
                "full_score": m.get("full_score"),
                "vs_full": comparison_text(m.get("vs_full")),
                "gold_logprob_drop": (m.get("metrics") or {}).get("gold_logprob_drop"),
                "gold_kl": (m.get("metrics") or {}).get("gold_kl"),
                "kept_fraction": m.get("kept_fraction"),
                "kv_mib_before": _mib(m.get("kv_bytes_before")),
                "kv_mib_after": _mib(m.get("kv_bytes_after")),
                "prefill_s": m.get("prefill_seconds"),
                "decode_tok_s": m.get("decode_tokens_per_second"),
                "peak_mib": _mib(m.get("peak_memory_bytes")),
                "status": run_status(r),
                "error": r.get("error"),
                "overrides": " ".join(r.get("overrides", [])),
                "output_dir": r.get("job", {}).get("output_dir"),
            }
        )
    return rows


def interval_text(ci) -> str | None:
    """A 95% interval as "[low, high]" (None when the run has none)."""
    if not ci or any(v is None for v in ci):
        return None
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def comparison_text(cmp: dict | None) -> str | None:
    """A paired comparison with the full cache: "-0.25 [-0.40, -0.10] p=0.003 *" (* = significant at 5%)."""
    if not cmp:
        return None
    text = f"{cmp['diff']:+.2f}"
    if cmp.get("ci"):
        text += f" {interval_text(cmp['ci'])}"
    if cmp.get("p") is not None:
        text += f" p={cmp['p']:.3g}"
    return text + (" *" if cmp.get("significant") else "")


def run_status(record: dict) -> str:
    """ok, interrupted or failed (a result.json from before the status field: ok, or interrupted)."""
    return record.get("status") or ("interrupted" if record.get("interrupted") else "ok")


def write_csv(rows: list[dict], path: str | Path) -> Path:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(TABLE_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    return _write_atomic(path, text.getvalue())


def markdown_table(rows: list[dict], columns: Iterable[str] = TABLE_COLUMNS[:-2]) -> str:
    """Rows as Markdown; the status and error columns only when some point did not finish ok."""
    columns = [c for c in columns if c not in CSV_ONLY_COLUMNS]
    if all(row.get("status", "ok") == "ok" and not row.get("error") for row in rows):
        columns = [c for c in columns if c not in STATUS_COLUMNS]
    return _markdown(columns, [[_cell(row.get(c), c) for c in columns] for row in rows])


def write_markdown(rows: list[dict], path: str | Path) -> Path:
    return _write_atomic(path, markdown_table(rows, TABLE_COLUMNS) + "\n")


def _cell(value, column: str) -> str:
    text = _fmt(value).replace("|", "\\|")
    if column == "error" and len(text) > ERROR_WIDTH:
        text = text[: ERROR_WIDTH - 3] + "..."
    return text


def _write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write through a temporary file and a rename: a reader (or a sweep killed meanwhile) never sees half
    a file, and parallel workers refreshing the same summary do not interleave."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)
    return path


def _finished(rows: list[dict]) -> list[dict]:
    """The rows whose score covers every sample (not failed, not interrupted): the ones to compare."""
    return [r for r in rows if r.get("status", "ok") == "ok"]


def score_tables(rows: list[dict]) -> str:
    """Markdown: one table per (model, task), a row per strategy, a column per budget (the score), and the
    full cache's score on the same samples."""
    points = [r for r in _finished(rows) if _is_number(r.get("score")) and _is_number(r.get("budget"))]
    out = []
    groups = sorted({(r["model"], r["task"], r.get("protocol") or "question_aware") for r in points}, key=str)
    for model, task, protocol in groups:
        these = [
            r
            for r in points
            if (r["model"], r["task"], r.get("protocol") or "question_aware") == (model, task, protocol)
        ]
        budgets = sorted({float(r["budget"]) for r in these if r["strategy"] != "full"})
        fulls = [float(r["full_score"]) for r in these if _is_number(r.get("full_score"))]
        cells: dict[str, dict[float, float]] = {}
        for r in these:
            if r["strategy"] != "full":
                text = _fmt(float(r["score"])) + (f" {r['score_ci']}" if r.get("score_ci") else "")
                cells.setdefault(r["strategy"], {})[float(r["budget"])] = text
        n = sorted({r.get("n_samples") for r in these if r.get("n_samples") is not None})
        head = f"**{task}** on {model}" + ("" if protocol == "question_aware" else f", {protocol}")
        head += f" ({', '.join(map(str, n))} samples)" if n else ""
        if fulls:
            head += f"; full cache: {sum(fulls) / len(fulls):.2f}"
        body = [[name] + [by.get(b, "-") for b in budgets] for name, by in sorted(cells.items())]
        out.append(head + "\n\n" + _markdown(["strategy"] + [f"{b:g}" for b in budgets], body))
    return "\n\n".join(out)


def plot_score_vs_budget(rows: list[dict], path: str | Path) -> Path | None:
    """PNG: score against budget, one line per strategy, one panel per (model, task); the full cache's
    score as a dashed line. None when no row has a score."""
    # the object API on an Agg canvas: renders to a file without a display and without touching
    # pyplot's global backend (a caller's own matplotlib setup stays as it is)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [r for r in _finished(rows) if _is_number(r.get("score")) and _is_number(r.get("budget"))]
    if not points:
        return None

    def panel(r):
        return r["model"], r["task"], r.get("protocol") or "question_aware"

    panels = sorted({panel(r) for r in points}, key=str)
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    names = sorted({r["strategy"] for r in points if r["strategy"] != "full"})
    legend_rows = math.ceil((len(names) + 1) / 4) if len(panels) > 1 else 0
    legend_inches = 0.25 * legend_rows + 0.2 * bool(legend_rows)
    fig = Figure(figsize=(5.2 * cols, 3.8 * nrows + legend_inches), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    styles = {name: ("-", "--", ":")[(i // 10) % 3] for i, name in enumerate(names)}
    for ax, (model, task, protocol) in zip(axes, panels):
        these = [r for r in points if panel(r) == (model, task, protocol)]
        for name in names:
            xy = sorted(
                (float(r["budget"]), float(r["score"]), r.get("score_low"), r.get("score_high"))
                for r in these
                if r["strategy"] == name
            )
            if xy:
                ax.plot(
                    [x for x, *_ in xy],
                    [y for _, y, *_ in xy],
                    marker="o",
                    markersize=3,
                    label=name,
                    color=colours[name],
                    linestyle=styles[name],
                )
                band = [(x, lo, hi) for x, _, lo, hi in xy if _is_number(lo) and _is_number(hi)]
                if band:  # the 95% interval of each point
                    ax.fill_between(
                        [x for x, _, _ in band],
                        [float(lo) for _, lo, _ in band],
                        [float(hi) for _, _, hi in band],
                        color=colours[name],
                        alpha=0.12,
                        linewidth=0,
                    )
        fulls = [float(r["full_score"]) for r in these if _is_number(r.get("full_score"))]
        if fulls:
            ax.axhline(sum(fulls) / len(fulls), linestyle="--", color="grey", label="full cache")
        budgets = sorted({float(r["budget"]) for r in these})
        if len(budgets) > 2 and budgets[-1] / budgets[0] >= 8:  # 0.05 ... 1: a log axis spreads the low budgets
            ax.set_xscale("log")
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
            ax.minorticks_off()
        suffix = "" if protocol == "question_aware" else f", {protocol}"
        ax.set_title(f"{task} ({model}{suffix})", fontsize=10)
        ax.set_xlabel("budget (fraction of prompt tokens kept)", fontsize=8)
        ax.set_ylabel("score", fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if len(panels) == 1:
        axes[0].legend(fontsize=8)
        fig.tight_layout()
    else:
        # one legend under all panels: a strategy may be missing from some of them
        entries: dict = {}
        for ax in axes[: len(panels)]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(label, handle)
        fig.legend(list(entries.values()), list(entries.keys()), loc="lower center", ncol=4, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return _write_atomic(path, buffer.getvalue())


def write_sweep_summary(
    sweep_dir: str | Path,
    result_file: str = "result.json",
    newer_than: float | None = None,
    sources: Iterable[str | Path] | None = None,
) -> dict[str, Path]:
    """results.csv, results.md, scores.md (strategy x budget per task) and score_vs_budget.png in `sweep_dir`,
    from the run JSONs under `sources` (default: `sweep_dir` itself). Failed and interrupted points are rows
    of results.csv / results.md (status, error) but not of scores.md and the plot."""
    sweep_dir = Path(sweep_dir)
    records = [r for src in (sources or [sweep_dir]) for r in collect(src, result_file, newer_than)]
    rows = table_rows(records)
    if not rows:
        return {}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    out = {
        "csv": write_csv(rows, sweep_dir / "results.csv"),
        "markdown": write_markdown(rows, sweep_dir / "results.md"),
    }
    tables = score_tables(rows)
    if tables:
        out["scores"] = _write_atomic(sweep_dir / "scores.md", tables + "\n")
    png = plot_score_vs_budget(rows, sweep_dir / "score_vs_budget.png")
    if png is not None:
        out["png"] = png
    return out


# ============================================================================ helpers


def strategy_label(record: dict) -> str:
    """What a run's strategy is called in tables: the config-group choice (else name / class of _target_), with
    the strategy fields the command line changed other than the budget: "look_m[merge_scope=same_modality]"."""
    strategy = record.get("config", {}).get("strategy", {})
    if strategy.get("_target_"):
        name = str(strategy["_target_"]).rsplit(".", 1)[-1]
    else:
        name = strategy.get("name") or record.get("choices", {}).get("strategy") or "?"
    changed = []
    for override in record.get("overrides", []):
        key, _, value = override.lstrip("+~").partition("=")
        field = key[len("strategy.") :] if key.startswith("strategy.") else None
        if field and field not in ("budget", "budget_tokens", "_target_"):
            changed.append(f"{field}={value}")
    return name + (f"[{','.join(changed)}]" if changed else "")


def _budget_value(strategy: dict):
    if strategy.get("name") == "full":
        return 1.0
    if strategy.get("budget_tokens") is not None:
        return None  # an absolute budget has no place on a fraction axis
    return strategy.get("budget")


def _budget_text(strategy: dict) -> str:
    if strategy.get("budget_tokens") is not None:
        return f"{strategy['budget_tokens']} tokens"
    return _fmt(strategy.get("budget"))


def _get(cfg: dict, dotted: str):
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _mib(n):
    return None if n is None else n / MIB


def _num(x) -> float:
    return float(x) if _is_number(x) else math.inf


def _is_number(x) -> bool:
    return is_number(x) and math.isfinite(x)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _markdown(headers: list[str], body: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])
