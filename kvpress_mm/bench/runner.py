"""Runs the benchmark matrix: every (model, prompt length, strategy, budget) against plain sdpa.

For one (model, length) all points (strategy x budget, and the eager reference) are measured in rounds:
each round runs every point once, in an order rotated from round to round, with a plain sdpa run before the
first point and after every `plain_every` points. A point's baseline is the pair of plain runs either side of
it, so slow drifts of the machine cancel out, and one plain run serves several points (a quarter to a third
fewer prefills than strict strategy / plain pairs). Medians over `repeats` rounds give the ratios. Lengths
are the outer loop (every model at 1k, then at 2k, ...), and bench.json is rewritten after each (length,
model), so a long run that is stopped early still holds complete short-prompt rows. Threads are pinned.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import kvpress_mm
from kvpress_mm.devices import device_problem

from ..validate import check_bool, check_choice, check_int, check_number, is_int, is_number
from .measure import decode_ms_per_token, prefill
from .models import RANDOM_SIZES, load_bench_model
from .overhead import OverheadSettings
from .report import write_reports

EAGER_REFERENCE = "eager_reference"
BENCH_MODELS = (*RANDOM_SIZES, "mini_llava")
DTYPES = ("float32", "bfloat16", "float16")
# matrix: every (model, length, strategy, budget) against plain sdpa; overhead: the framework's cost per layer
# (bench/overhead.py, its settings under `overhead`)
MODES = ("matrix", "overhead")
MIN_LENGTH = 16


def check_device(name: str) -> None:
    """ValueError naming the device when torch cannot use it here (before any model is built); the same
    check as the `eval` command's `device` (kvpress_mm.devices), limited to cpu and cuda."""
    problem = device_problem(name, types=("cpu", "cuda"))
    if problem:
        raise ValueError(f"bench: device {problem}")


@dataclass
class BenchSettings:
    models: list[str] = field(default_factory=lambda: ["tiny", "mid", "mini_llava"])
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    strategies: list[str] = field(default_factory=list)  # empty: every registered strategy
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.2])
    repeats: int = 3
    plain_every: int = 3  # a plain sdpa run after every this many points of a round (1: strict pairs)
    decode_tokens: int = 16
    batch: int = 1  # prompts per forward (random models only)
    padding: float = 0.0  # left padding of the last row, as a share of the prompt (rows between: less)
    threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    eager_reference: bool = True
    eager_max_length: int = 4096  # the L x L reference needs ~heads * L^2 * 4 bytes per layer
    output_dir: str | None = "."
    mode: str = "matrix"
    overhead: OverheadSettings = field(default_factory=OverheadSettings)

    def __post_init__(self):
        # every setting is checked before any model loads: a typo must not surface after an hour of measuring
        check_choice("bench", "mode", self.mode, MODES)
        if isinstance(self.overhead, dict):
            self.overhead = OverheadSettings(**self.overhead)
        for name in ("repeats", "plain_every", "threads", "batch"):
            check_int("bench", name, getattr(self, name), minimum=1)
        check_int("bench", "decode_tokens", self.decode_tokens, minimum=0)
        check_int("bench", "eager_max_length", self.eager_max_length, minimum=0)
        check_bool("bench", "eager_reference", self.eager_reference)
        unknown = [m for m in self.models if m not in BENCH_MODELS]
        if unknown or not self.models:
            raise ValueError(f"bench: models {unknown or self.models!r} unknown; choose from {', '.join(BENCH_MODELS)}")
        bad = [n for n in self.lengths if not is_int(n) or n < MIN_LENGTH]
        if bad or not self.lengths:
            raise ValueError(f"bench: lengths must be integers >= {MIN_LENGTH}, got {bad or self.lengths!r}")
        bad = [b for b in self.budgets if not is_number(b) or not 0 < b <= 1]
        if bad or not self.budgets:
            raise ValueError(f"bench: budgets must be in (0, 1], got {bad or self.budgets!r}")
        check_choice("bench", "dtype", self.dtype, DTYPES)
        check_device(self.device)
        check_number("bench", "padding", self.padding, 0, 1, high_open=True)
        if self.padding and self.batch < 2:
            raise ValueError(f"bench: padding={self.padding} needs batch >= 2 (the first row is never padded)")
        if self.batch > 1 and "mini_llava" in self.models:
            raise ValueError(
                f"bench: batch={self.batch}: mini_llava runs with batch=1 only; choose models from "
                f"{', '.join(RANDOM_SIZES)}"
            )


@dataclass
class Point:
    """One row of the result: a strategy at a budget (eager: read its statistics the LOOK-M release's way)."""

    name: str
    budget: float
    strategy: object
    eager: bool = False
    runs: list = field(default_factory=list)  # (time, peak bytes, decode ms) of each round
    plain: list = field(default_factory=list)  # the same, averaged over the plain runs either side
    report: object = None


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _run(bench, inputs, point: Point | None, settings, device) -> tuple[float, float, float | None, object]:
    strategy = point.strategy if point is not None else None
    eager = point is not None and point.eager
    run = prefill(bench, inputs, strategy, device, eager=eager)
    decode = None
    if settings.decode_tokens and not eager:
        decode = decode_ms_per_token(bench, run, settings.decode_tokens, device)
    return run.seconds, float(run.peak_bytes), decode, run.report


def _mean_of(a: tuple, b: tuple) -> tuple:
    return tuple(None if x is None or y is None else (x + y) / 2 for x, y in zip(a, b))


def measure_rounds(bench, inputs, points: list[Point], settings, device, on_round=None) -> None:
    """Fill each point's `runs` and `plain` (see the module docstring)."""
    for rep in range(settings.repeats):
        shift = rep * max(1, len(points) // settings.repeats)
        order = points[shift:] + points[:shift]
        if rep % 2:
            order.reverse()
        before = _run(bench, inputs, None, settings, device)[:3]
        for start in range(0, len(order), settings.plain_every):
            group = order[start : start + settings.plain_every]
            measured = []
            for point in group:
                *numbers, report = _run(bench, inputs, point, settings, device)
                measured.append((point, tuple(numbers)))
                point.report = report
            after = _run(bench, inputs, None, settings, device)[:3]
            for point, numbers in measured:
                point.runs.append(numbers)
                point.plain.append(_mean_of(before, after))
            before = after
        if on_round is not None:
            on_round()


def record_of(point: Point) -> dict:
    """Medians and ratios of one measured point."""
    col = lambda rows, i: [r[i] for r in rows if r[i] is not None]  # noqa: E731
    t, plain_t = _median(col(point.runs, 0)), _median(col(point.plain, 0))
    mem, plain_mem = _median(col(point.runs, 1)), _median(col(point.plain, 1))
    record = {
        "strategy": point.name,
        "budget": point.budget,
        "prefill_seconds": t,
        "plain_prefill_seconds": plain_t,
        "prefill_ratio": t / plain_t,
        "peak_bytes": mem,
        "plain_peak_bytes": plain_mem,
        # a floor of 1 MiB keeps tiny prompts (whose plain peak is ~0) from giving absurd ratios
        "peak_memory_ratio": mem / max(2.0**20, plain_mem),
        "repeats": len(point.runs),
    }
    if col(point.runs, 2):
        dec, full_dec = _median(col(point.runs, 2)), _median(col(point.plain, 2))
        record.update(decode_ms_per_token=dec, full_decode_ms_per_token=full_dec, decode_ratio=dec / full_dec)
    report = point.report
    if report is not None and report.before_bytes:
        record.update(
            kv_bytes_before=report.before_bytes,
            kv_bytes_after=report.after_bytes,
            kv_ratio=report.after_bytes / report.before_bytes,
        )
    return record


def machine(device: torch.device) -> str:
    """What the numbers were measured on: the GPU's name, or the CPU's model and its widest vector unit
    (the same code measures differently on AVX2 and AVX-512 machines)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    vector = next(
        (name for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None
    )
    return f"{model}, {vector}" if vector else model


def _points(names, settings, prompt: int, bench=None, chosen: bool = True) -> list[Point]:
    """The (strategy, budget) points; with `bench`, a strategy that cannot run on its model (sparsemm without a
    head profile) is skipped with a line when the default list was used, and an error when it was chosen."""
    points = []
    for name in names:
        these = [Point(name, budget, kvpress_mm.get_strategy(name, budget=budget)) for budget in settings.budgets]
        if bench is not None:
            try:
                for point in these:
                    with point.strategy(bench.model):
                        pass
            except ValueError as err:
                if chosen:
                    raise ValueError(f"bench: strategy {name!r} cannot run on {bench.name}: {err}") from None
                tqdm.write(f"skipping {name} on {bench.name}: {str(err).splitlines()[0]}")
                continue
        points += these
    if settings.eager_reference and prompt <= settings.eager_max_length:
        points.append(Point(EAGER_REFERENCE, 0.2, kvpress_mm.get_strategy("h2o", budget=0.2), eager=True))
    return points


def run_benchmark(settings: BenchSettings) -> list[dict]:
    """Measure the matrix of `settings`; writes bench.json, bench.md (every record), bench_summary.md (a row per
    strategy at each model's longest prompt) and bench.png to output_dir."""
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    dtype = getattr(torch, settings.dtype)
    names = settings.strategies or [n for n in kvpress_mm.list_strategies() if n != "full"]
    for name in names:
        kvpress_mm.get_strategy(name)  # an unknown name fails now, not after an hour of measuring
    records: list[dict] = []
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for model_name in settings.models:
        try:
            models[model_name] = load_bench_model(model_name, device, dtype)
        except (ImportError, FileNotFoundError, OSError) as err:
            tqdm.write(f"skipping {model_name}: {err}")
    rounds = len(settings.lengths) * len(models) * settings.repeats
    with tqdm(total=rounds, desc="bench rounds") as bar:
        for length in settings.lengths:
            for model_name, bench in models.items():
                inputs = bench.make_inputs(length, settings.batch, settings.padding)
                prompt = int(inputs["input_ids"].shape[1])
                bar.set_postfix_str(f"{model_name} @ {prompt} tokens")
                prefill(bench, inputs, None, device)  # warm-up
                points = _points(names, settings, prompt, bench, chosen=bool(settings.strategies))
                measure_rounds(bench, inputs, points, settings, device, on_round=bar.update)
                base = {
                    "model": model_name,
                    "length": prompt,
                    "device": str(device),
                    "dtype": settings.dtype,
                    "threads": settings.threads,
                    "batch": settings.batch,
                    "padding": settings.padding,
                    "machine": machine(device),
                }
                records.extend({**base, **record_of(p)} for p in points)
                (out / "bench.json").write_text(
                    json.dumps({"settings": asdict(settings), "records": records}, indent=1)
                )
    records.sort(key=lambda r: (list(models).index(r["model"]), r["length"]))
    write_reports(records, out, 0.2 if 0.2 in settings.budgets else settings.budgets[-1])
    (out / "bench.json").write_text(json.dumps({"settings": asdict(settings), "records": records}, indent=1))
    return records
