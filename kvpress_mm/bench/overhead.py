"""The framework's own cost per layer: `kvpress-mm bench mode=overhead` (issue 21).

On a GPU a layer's attention takes tens of microseconds, so what the framework does per layer in Python, in
small kernels and in host reads is the cost. A many-layer narrow model at a short prompt shows that cost on
a CPU too: there the model's own work per layer is small and the framework's is not.

    overhead per layer = median over pairs of (prefill with the strategy - plain prefill) / managed layers

Each pair runs plain sdpa and the strategy back to back, in alternating order (plain first in one pair,
the strategy first in the next), and a round measures one pair of every contender in an order rotated
from round to round, so slow drifts of a shared machine cancel out. When kvpress (NVIDIA's text-only
press library, the `compare` extra) can be imported, its presses of the same names run beside ours
in the same rounds (see `kvpress_contenders`).

Host synchronisations: every value read back to the host (`.item()`, `.tolist()`, `bool()`, `int()`,
`float()`, an index) and every op whose output size depends on the data (`nonzero`, boolean-mask indexing,
`masked_select`, `unique`, ...) stalls a GPU's launch queue. They are counted on any device with a torch
function mode, per prompt and per layer (from a 2-layer and a 4-layer copy of the model: per layer =
the difference / 2); on CUDA the synchronisations the driver really saw are counted as well
(`torch.cuda.set_sync_debug_mode`), over the whole model's prefill.
"""

from __future__ import annotations

import collections
import gc
import json
import statistics
import sys
import time
import types
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from ..validate import check_choice, check_int, check_number
from .models import RANDOM_SIZES, random_llama

DEFAULT_STRATEGIES = ("streaming_llm", "knorm", "snapkv", "h2o", "look_m")
KVPRESS_MODES = ("auto", "on", "off")
CLOCKS = ("auto", "wall", "thread")

# tensor methods / functions that read a value back to the host
_READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"})
# ops whose output shape depends on the data: on a GPU each waits for the queued kernels
_DATA_SIZED = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "nonzero_static"})


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostReadCounter(TorchFunctionMode):
    """Counts host reads and data-sized ops of the torch calls made inside it (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _READS or name in _DATA_SIZED:
            self.counts[name] += 1
        elif name in ("__getitem__", "__setitem__") and _bool_index(args):
            self.counts[f"{name}[bool]"] += 1
        elif name == "to" and any(_is_cpu(a) for a in (*args[1:], *(kwargs or {}).values())):
            if isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
                self.counts["to(cpu)"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _is_cpu(value) -> bool:
    return (isinstance(value, str) and value.startswith("cpu")) or (
        isinstance(value, torch.device) and value.type == "cpu"
    )


@dataclass
class OverheadSettings:
    """The overhead mode's settings (conf/bench.yaml, `overhead:`)."""

    model: str = "narrow"  # a bench.models.RANDOM_SIZES name: narrow = 32 layers of hidden 64
    length: int = 256
    budget: float = 0.2
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    pairs: int = 15  # rounds; each measures one (plain, strategy) pair per contender
    warmup: int = 2  # unmeasured prefills of every contender first
    kvpress: str = "auto"  # auto: beside ours when importable; on: fail when it is not; off: ours only
    host_reads: bool = True
    clock: str = "auto"  # see clock_of

    def __post_init__(self):
        if self.model not in RANDOM_SIZES:
            raise ValueError(f"bench: overhead.model {self.model!r} unknown; choose from {', '.join(RANDOM_SIZES)}")
        check_int("bench", "overhead.length", self.length, minimum=16)
        check_number("bench", "overhead.budget", self.budget, 0, 1, low_open=True)
        check_int("bench", "overhead.pairs", self.pairs, minimum=1)
        check_int("bench", "overhead.warmup", self.warmup, minimum=0)
        check_choice("bench", "overhead.kvpress", self.kvpress, KVPRESS_MODES)
        check_choice("bench", "overhead.clock", self.clock, CLOCKS)
        if not self.strategies:
            raise ValueError("bench: overhead.strategies is empty; name at least one strategy")


# ============================================================================ contenders


@dataclass
class Contender:
    """One thing measured against plain prefill: `enter(model)` gives a context manager, or None for plain."""

    name: str
    library: str  # "kvpress_mm" or "kvpress"
    strategy: str  # the strategy's name in this project (the row of the table)
    make: object  # model -> context manager
    differences: list = field(default_factory=list)  # seconds, one per pair
    seconds: list = field(default_factory=list)
    reads: dict | None = None


def kvpress_module():
    """kvpress, or the reason it cannot be imported (str).

    kvpress 0.5.5 imports `datasets` and `fire` at module level for two presses this comparison does not use
    (DuoAttention's pattern download, the ExpectedAttention statistics script); where they are not installed
    they are stood in for by empty modules, which raise if those presses are ever used."""
    if "kvpress" in sys.modules:
        return sys.modules["kvpress"]
    stand_ins = []
    for name in ("datasets", "fire"):
        try:
            __import__(name)
        except ImportError:
            stand_in = types.ModuleType(name)
            stand_in.__getattr__ = _missing(name)
            sys.modules[name] = stand_in
            stand_ins.append(name)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # importing kvpress wraps every registered attention function (its head-wise masking patch), ours too when
    # a strategy context registered them before, with a wrapper that passes `dropout` positionally: ours are put
    # back. Every contender, plain sdpa included, then runs through kvpress's patched sdpa.
    ours = {name: f for name, f in ALL_ATTENTION_FUNCTIONS.items() if name.startswith("kvpress_mm_")}
    try:
        import kvpress
    except Exception as err:  # noqa: BLE001 - any failure only means there is no comparison
        for name in stand_ins:
            sys.modules.pop(name, None)
        return f"{type(err).__name__}: {err}"
    finally:
        for name, f in ours.items():
            ALL_ATTENTION_FUNCTIONS[name] = f
    return kvpress


def _missing(module: str):
    """A stand-in module's __getattr__: every name is a function that raises when called."""

    def getattr_(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise ImportError(f"{module}.{name}: {module} is not installed (kvpress-mm's benchmark stood in for it)")

        return unavailable

    return getattr_


def _kvpress_hook(press):
    """kvpress 0.5.5 reads `past_key_values` and `cache_position` from the attention module's kwargs; the
    transformers 5.2x this project uses passes `cache` and no cache_position. The hook gets both names (the
    positions of the new tokens, one tensor per forward, as the model made them before)."""
    original = press.forward_hook
    positions: dict = {}

    def forward_hook(module, args, kwargs, output):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if "cache_position" not in kwargs and cache is not None:
            q_len = kwargs["hidden_states"].shape[1]
            past = cache.layers[module.layer_idx].get_seq_length() - q_len
            key = (past, q_len, kwargs["hidden_states"].device)
            if key not in positions:
                positions.clear()
                positions[key] = torch.arange(past, past + q_len, device=key[2])
            kwargs = {**kwargs, "past_key_values": cache, "cache_position": positions[key]}
        return original(module, args, kwargs, output)

    press.forward_hook = forward_hook  # BasePress.__call__ registers self.forward_hook
    return press


def kvpress_presses(kvpress, budget: float) -> dict:
    """Our strategy name -> a kvpress press of the same algorithm and settings (compression_ratio = 1 -
    budget: kvpress keeps int(L * (1 - ratio)) keys, our floor(budget * L)). H2O / LOOK-M have no sdpa press
    there (ObservedAttentionPress needs eager attention and its L x L probabilities)."""
    ratio = 1.0 - budget
    return {
        "streaming_llm": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio, window_size=32, kernel_size=5),
    }


def contenders(settings: OverheadSettings) -> tuple[list[Contender], str | None]:
    """Ours for each strategy, kvpress's where it has the same press; and why kvpress is absent (or None)."""
    import kvpress_mm

    out = []
    for name in settings.strategies:
        strategy = kvpress_mm.get_strategy(name, budget=settings.budget)
        out.append(Contender(name, "kvpress_mm", name, strategy))
    if settings.kvpress == "off":
        return out, "off (overhead.kvpress=off)"
    kvpress = kvpress_module()
    if isinstance(kvpress, str):
        if settings.kvpress == "on":
            raise ValueError(f"bench: overhead.kvpress=on but kvpress cannot be imported: {kvpress}")
        return out, f"not importable ({kvpress}); pip install --no-deps kvpress==0.5.5 cachetools"
    presses = kvpress_presses(kvpress, settings.budget)
    for name in settings.strategies:
        if name in presses:
            press = _kvpress_hook(presses[name]())
            out.append(Contender(f"kvpress:{name}", "kvpress", name, press))
    return out, None


# ============================================================================ measuring


def clock_of(name: str, device: torch.device):
    """The timer: `thread` (this thread's CPU time: time the scheduler gave to other processes on a shared machine
    is not counted; single-threaded CPU runs only), `wall` (perf_counter, after a device sync); auto: thread on
    a CPU with one torch thread, else wall."""
    if name == "auto":
        name = "thread" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    return (time.thread_time if name == "thread" else time.perf_counter), name


def _prefill_seconds(model, config, ids, context, clock=time.perf_counter) -> float:
    from transformers import DynamicCache

    device = ids.device
    gc.collect()
    cache = DynamicCache(config=config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    gc.disable()
    try:
        with torch.no_grad(), nullcontext() if context is None else context(model):
            start = clock()
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return clock() - start
    finally:
        gc.enable()


def measure_pairs(
    model, config, ids, entries: list[Contender], pairs: int, warmup: int, on_round=None, clock=time.perf_counter
) -> None:
    """Fill each contender's `differences` / `seconds` (see the module docstring). The clock runs inside the
    context (entering and leaving it are once per context, not per layer): the prefill itself, hooks and all."""
    for _ in range(warmup):
        _prefill_seconds(model, config, ids, None, clock)
        for entry in entries:
            _prefill_seconds(model, config, ids, entry.make, clock)
    for rnd in range(pairs):
        shift = rnd % len(entries)
        order = entries[shift:] + entries[:shift]
        for i, entry in enumerate(order):
            if (rnd + i) % 2 == 0:
                plain = _prefill_seconds(model, config, ids, None, clock)
                mine = _prefill_seconds(model, config, ids, entry.make, clock)
            else:
                mine = _prefill_seconds(model, config, ids, entry.make, clock)
                plain = _prefill_seconds(model, config, ids, None, clock)
            entry.differences.append(mine - plain)
            entry.seconds.append((mine, plain))
        if on_round is not None:
            on_round()


def count_reads(model, config, ids, context=None) -> int:
    """Host reads and data-sized ops of one prefill with `context` (a strategy or press; None: plain)."""
    from transformers import DynamicCache

    counter = HostReadCounter()
    with torch.no_grad(), nullcontext() if context is None else context(model):
        with counter:
            model(input_ids=ids, cache=DynamicCache(config=config), use_cache=True, logits_to_keep=1)
    return counter.total


def cuda_syncs(model, config, ids, context) -> int | None:
    """Synchronisations CUDA reported during one prefill (sync debug mode), None off CUDA."""
    from transformers import DynamicCache

    if ids.device.type != "cuda":
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad(), context(model):
                model(input_ids=ids, cache=DynamicCache(config=config), use_cache=True, logits_to_keep=1)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def reads_per_layer(settings: OverheadSettings, entry: Contender, device, dtype) -> dict:
    """{per_layer, per_prompt}: the reads a contender adds to a prefill, counted on a 2-layer and a 4-layer copy
    of the bench model; per prompt: beyond the plain prefill's own (the model's mask checks)."""
    counts, plain = {}, 0
    for layers in (2, 4):
        bench = random_llama(settings.model, device, dtype, layers=layers)
        ids = bench.make_inputs(settings.length)["input_ids"]
        with torch.no_grad():
            bench.model(input_ids=ids, use_cache=True, logits_to_keep=1)  # lazy set-up outside the count
        counts[layers] = count_reads(bench.model, bench.config, ids, entry.make)
        if layers == 2:
            plain = count_reads(bench.model, bench.config, ids)
    per_layer = (counts[4] - counts[2]) / 2
    return {"per_layer": per_layer, "per_prompt": counts[2] - 2 * per_layer - plain}


# ============================================================================ the run


def run_overhead(
    settings: OverheadSettings,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int = 1,
    output_dir: str | None = ".",
    progress: bool = True,
) -> dict:
    """Measure; writes overhead.json and overhead.md to output_dir; returns the result (see `result_of`)."""
    from tqdm import tqdm

    from .runner import machine

    torch.set_num_threads(threads)
    torch_device = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    entries, kvpress_note = contenders(settings)
    bench = random_llama(settings.model, torch_device, torch_dtype)
    ids = bench.make_inputs(settings.length)["input_ids"]
    layers = bench.config.num_hidden_layers
    clock, clock_name = clock_of(settings.clock, torch_device)
    with tqdm(total=settings.pairs, desc="overhead pairs", disable=not progress) as bar:
        measure_pairs(bench.model, bench.config, ids, entries, settings.pairs, settings.warmup, bar.update, clock)
    syncs = {}
    for entry in entries:
        if settings.host_reads:
            entry.reads = reads_per_layer(settings, entry, torch_device, torch_dtype)
        syncs[entry.name] = cuda_syncs(bench.model, bench.config, ids, entry.make)
    result = result_of(entries, layers, syncs)
    result.update(
        settings=asdict(settings),
        device=device,
        dtype=dtype,
        threads=threads,
        layers=layers,
        clock=clock_name,
        machine=machine(torch_device),
        kvpress=kvpress_note or f"kvpress {_kvpress_version()}",
    )
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "overhead.json").write_text(json.dumps(result, indent=1))
        (out / "overhead.md").write_text(overhead_table(result))
    return result


def _kvpress_version() -> str:
    try:
        from importlib.metadata import version

        return version("kvpress")
    except Exception:  # noqa: BLE001
        return "?"


def result_of(entries: list[Contender], layers: int, syncs: dict) -> dict:
    """Rows: ms per layer (median of the pairs' differences / layers), the prefills' medians, host reads."""
    rows = []
    for entry in entries:
        diffs = entry.differences
        row = {
            "strategy": entry.strategy,
            "library": entry.library,
            "ms_per_layer": 1000 * statistics.median(diffs) / layers,
            # the spread of the pairs: a quarter of them were below / above these
            "ms_per_layer_q1": 1000 * _quantile(diffs, 0.25) / layers,
            "ms_per_layer_q3": 1000 * _quantile(diffs, 0.75) / layers,
            "prefill_ms": 1000 * statistics.median(s for s, _ in entry.seconds),
            "plain_prefill_ms": 1000 * statistics.median(p for _, p in entry.seconds),
            "pairs": len(diffs),
        }
        if entry.reads is not None:
            row.update(reads_per_layer=entry.reads["per_layer"], reads_per_prompt=entry.reads["per_prompt"])
        if syncs.get(entry.name) is not None:
            row["cuda_syncs"] = syncs[entry.name]
        rows.append(row)
    return {"rows": rows}


def _quantile(values, q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def overhead_table(result: dict) -> str:
    """Markdown: a row per strategy, ours beside kvpress's press of the same name."""
    by = collections.defaultdict(dict)
    for row in result["rows"]:
        by[row["strategy"]][row["library"]] = row
    cuda = any("cuda_syncs" in r for r in result["rows"])
    head = [
        "strategy",
        "kvpress-mm ms/layer",
        "kvpress ms/layer",
        "kvpress-mm host reads / layer",
        "kvpress-mm host reads / prompt",
        "kvpress host reads / layer",
        "plain prefill ms",
    ]
    if cuda:
        head += ["kvpress-mm CUDA syncs / prefill", "kvpress CUDA syncs / prefill"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(row, key, fmt):
        return "-" if row is None or row.get(key) is None else fmt.format(row[key])

    for name, libs in by.items():
        ours, theirs = libs.get("kvpress_mm"), libs.get("kvpress")
        spread = "" if ours is None else f" ({ours['ms_per_layer_q1']:.2f}-{ours['ms_per_layer_q3']:.2f})"
        cells = [
            name,
            cell(ours, "ms_per_layer", "{:.3f}") + spread,
            cell(theirs, "ms_per_layer", "{:.3f}"),
            cell(ours, "reads_per_layer", "{:g}"),
            cell(ours, "reads_per_prompt", "{:g}"),
            cell(theirs, "reads_per_layer", "{:g}"),
            cell(ours, "plain_prefill_ms", "{:.1f}"),
        ]
        if cuda:
            cells += [cell(ours, "cuda_syncs", "{}"), cell(theirs, "cuda_syncs", "{}")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"{result.get('layers')} layers, {result['settings']['length']} tokens, budget {result['settings']['budget']}, "
        f"{result.get('device')} {result.get('dtype')}, {result.get('threads')} thread(s), {result.get('machine')}; "
        f"medians of {result['settings']['pairs']} alternating pairs ({result.get('clock')} clock; quartiles in "
        f"brackets); host reads per prompt: beyond the plain prefill's own; kvpress: {result.get('kvpress')}",
    ]
    return "\n".join(lines + notes) + "\n"
