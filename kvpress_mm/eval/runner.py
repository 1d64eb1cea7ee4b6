"""`evaluate(bundle, task, strategy)`: run a task's samples with a strategy (and the full cache) and measure.

Per batch of samples (left-padded by the bundle):
  1. the full cache: plain `model.generate` (no strategy installed), greedy;
  2. the strategy: the same `generate` inside `with strategy(model) as press`; the KV sizes and kept fraction
     come from `press.report` (the prompt cache right after prefill compression).
Generate tasks score both answers with `task.score`; the fidelity task instead forces the full cache's
greedy tokens on the strategy's generate (a logits processor, so positions / masks / the compressed cache
are generate's own) and compares the raw next-token logits step by step (see tasks/fidelity.py).

Definitions (RunResult): score / full_score = mean sample score; kept_fraction = mean over samples of the
report's kept fraction (real prompt tokens kept / real prompt tokens, averaged over layers and kv heads);
kv_bytes_before / kv_bytes_after = mean per sample of the prompt KV cache bytes before / after compression
(a batch's bytes divided by its rows, so padded slots count); prefill_seconds = mean duration of one prefill
forward (one batch; compression included); decode_tokens_per_second = (decode forward calls x rows) /
decode seconds, over all batches; peak_memory_bytes = the largest peak of one strategy generate (CUDA
allocator peak, or the process RSS peak on CPU, weights included; *_increase_bytes: above the memory at
the start of that generate).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..context import ForcedTokens, compress_context
from ..validate import check_int
from .memory import PeakMemory
from .metrics import bootstrap_interval, mean, next_token_kl, paired_comparison, score_interval
from .metrics import fidelity as fidelity_metrics
from .models.bundle import ModelBundle
from .protocol import PROTOCOLS, SplitSample, split_questions
from .tasks import Task, get_task
from .timing import ForwardTimer

# full-cache generations by (model, task config, batch): a sweep over strategies and budgets in one
# process runs the reference once per batch instead of once per sweep point
_FULL_RUNS: dict = {}

# a short generate on the first batch before anything is timed (first-call overheads: kernels, allocator)
WARMUP_NEW_TOKENS = 2


@dataclass
class RunResult:
    """One (model, task, strategy) evaluation; `to_dict()` is JSON-serialisable. Definitions: runner.py."""

    model: str
    task: str
    strategy: str
    score: float
    full_score: float | None
    kept_fraction: float
    kv_bytes_before: float
    kv_bytes_after: float
    prefill_seconds: float
    decode_tokens_per_second: float | None
    peak_memory_bytes: int | None
    n_samples: int
    samples: list[dict]
    notes: str
    peak_memory_increase_bytes: int | None = None
    full_prefill_seconds: float | None = None
    full_decode_tokens_per_second: float | None = None
    full_peak_memory_bytes: int | None = None
    full_peak_memory_increase_bytes: int | None = None
    metrics: dict = field(default_factory=dict)
    prompt_tokens_mean: float = 0.0
    task_config: dict = field(default_factory=dict)
    strategy_config: dict = field(default_factory=dict)
    model_info: dict = field(default_factory=dict)
    batch_size: int = 1
    device: str = "cpu"
    memory_method: str = "none"
    wall_seconds: float = 0.0
    interrupted: bool = False  # stopped early (Ctrl-C): the fields cover the samples finished before
    # 95% intervals of score / full_score (Wilson for 0/1 scores, bootstrap over samples otherwise) and the
    # paired comparison strategy vs full on the same samples (metrics.paired_comparison)
    score_ci: tuple | None = None
    full_score_ci: tuple | None = None
    vs_full: dict | None = None
    protocol: str = "question_aware"  # where the question sits relative to the compressed cache (protocol.py)
    n_contexts: int = 0  # distinct compressed prompts (question_agnostic: one per sample, however many questions)

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


class EvaluationInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt during `evaluate`, carrying the RunResult of the samples finished before it
    (`result`; `results`: one per strategy of `evaluate_many`; `interrupted` is True on each): a caller
    that catches it can save them; others stop as on any Ctrl-C."""

    def __init__(self, result: RunResult, *more: RunResult):
        super().__init__(f"interrupted after {result.n_samples} samples")
        self.result = result
        self.results = [result, *more]


def _jsonable(obj: Any):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return str(obj)


# ----------------------------------------------------------------------------------------- generate


@dataclass
class _Generation:
    new_tokens: torch.Tensor  # [B, T] on CPU
    logits: torch.Tensor | None  # [B, T, V] float32 on CPU (raw, before logits processors)
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    peak_bytes: int | None
    peak_increase_bytes: int | None
    memory_method: str
    report: Any = None


def _generate(
    bundle: ModelBundle,
    inputs: dict,
    strategy,
    max_new_tokens: int,
    device,
    force: torch.Tensor | None = None,
    logits: bool = False,
) -> _Generation:
    from transformers import LogitsProcessorList

    model = bundle.model
    kwargs = {
        **bundle.generate_kwargs,
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_logits": logits,
    }
    prompt_len = inputs["input_ids"].shape[1]
    if force is not None:
        forced = (
            ForcedTokens.from_rows(force, prompt_len) if isinstance(force, list) else ForcedTokens(force, prompt_len)
        )
        kwargs["logits_processor"] = LogitsProcessorList([forced])
    session = strategy(model) if strategy is not None else nullcontext()
    with PeakMemory(device) as mem, ForwardTimer(model, device) as timer:
        with session as press:
            out = model.generate(**inputs, **kwargs)
    new_tokens = out.sequences[:, prompt_len:].cpu()
    raw = torch.stack(out.logits, 1).float().cpu() if logits else None
    del out
    return _Generation(
        new_tokens=new_tokens,
        logits=raw,
        prefill_seconds=timer.prefill_seconds,
        decode_seconds=timer.decode_seconds,
        decode_steps=timer.decode_steps,
        peak_bytes=mem.peak_bytes,
        peak_increase_bytes=mem.increase_bytes,
        memory_method=mem.method,
        report=getattr(press, "report", None),
    )


def _ask(
    bundle: ModelBundle,
    split: SplitSample,
    strategy,
    max_new_tokens: int,
    device,
    force: torch.Tensor | None = None,
    logits: bool = False,
    batch_size: int | None = None,
    unit: _SharedUnit | None = None,
) -> _Generation:
    """The question-agnostic protocol: compress the context alone (strategy None: the full cache), then ask
    every question on its own copy. Timings: prefill = the context's forward (with a shared `unit`: the shared
    forward + this strategy's compression of its copy); decode = the rest (each question's own forward included)."""
    import kvpress_mm

    from ..context import CompressedContext

    model = bundle.model
    strategy = strategy if strategy is not None else kvpress_mm.get_strategy("full")
    forced = None
    if force is not None:
        forced = list(force)
        batch_size = 1  # a forced row's length is its own: one question per call keeps positions simple
    with PeakMemory(device) as mem, ForwardTimer(model, device) as timer:
        if unit is None:
            context = compress_context(model, strategy, split.context)
        else:
            cache, report, seconds = unit.compress(strategy)
            context = CompressedContext.of(model, strategy, cache, unit.prefill.inputs, report)
        answers = context.ask(
            split.questions,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            output_logits=logits,
            forced=forced,
            **bundle.generate_kwargs,
        )
    new_tokens, raw = _stack_answers(bundle, answers, logits)
    if unit is None:
        prefill, decode, steps = timer.prefill_seconds, timer.decode_seconds, max(0, timer.calls - 1)
        peak = mem.peak_bytes
    else:  # every forward of this call is a question's or a decode step's
        prefill, decode, steps = unit.seconds + seconds, _span(timer), timer.calls
        peak = _max([unit.peak_bytes, mem.peak_bytes])
    return _Generation(
        new_tokens=new_tokens,
        logits=raw,
        prefill_seconds=prefill,
        decode_seconds=decode,
        decode_steps=steps,
        peak_bytes=peak,
        peak_increase_bytes=mem.increase_bytes,
        memory_method=mem.method,
        report=context.report,
    )


def _span(timer: ForwardTimer) -> float:
    """Seconds from the first forward's start to the last one's end."""
    return timer.ends[-1] - timer.starts[0] if timer.calls else 0.0


def _stack_answers(bundle: ModelBundle, answers, logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Answers of several lengths as [n, T] tokens (pad-filled) and [n, T, vocab] logits (zero-filled)."""
    width = max(a.tokens.shape[0] for a in answers)
    pad = int(bundle.generate_kwargs.get("pad_token_id") or 0)
    new_tokens = torch.full((len(answers), width), pad, dtype=torch.long)
    raw = None
    if logits:
        raw = torch.zeros((len(answers), width, answers[0].logits.shape[-1]), dtype=torch.float32)
    for b, a in enumerate(answers):
        new_tokens[b, : a.tokens.shape[0]] = a.tokens.cpu()
        if logits:
            raw[b, : a.logits.shape[0]] = a.logits.cpu()
    return new_tokens, raw


def _gold_answer_stats(bundle, batch, run_one, strategy, key, max_tokens: int) -> list[dict]:
    """Per question: the gold answer's log-likelihood under the strategy's cache and the full one
    (teacher-forced), and the mean next-token KL(full || strategy) over the gold tokens."""
    gold = [torch.tensor(bundle.encode(s.answer)[:max_tokens], dtype=torch.long) for s in batch]
    if any(g.numel() == 0 for g in gold):
        return [{} for _ in batch]
    steps = max(g.numel() for g in gold)
    full_key = (*key, "gold")
    full = _FULL_RUNS.get(full_key)
    if full is None:
        full = _FULL_RUNS[full_key] = run_one(None, steps, force=gold, logits=True)
    run = run_one(strategy, steps, force=gold, logits=True)
    out = []
    for b, g in enumerate(gold):
        n = g.numel()
        lp = torch.log_softmax(run.logits[b, :n].double(), -1).gather(-1, g[:, None]).sum()
        full_lp = torch.log_softmax(full.logits[b, :n].double(), -1).gather(-1, g[:, None]).sum()
        kl = next_token_kl(full.logits[b, :n], run.logits[b, :n]).mean()
        out.append({"gold_logprob": float(lp), "full_gold_logprob": float(full_lp), "gold_kl": float(kl)})
    return out


def _units(samples, protocol: str, batch_size: int):
    """(single-question samples of one generate unit, the multi-question sample they come from or None).

    question_aware: every question is its own prompt (context + question), batched by batch_size;
    question_agnostic: one sample's questions together, on one compressed context."""
    if protocol == "question_aware":
        singles = [q for s in samples for q in _singles(s)]
        for batch in _batches(singles, batch_size):
            yield batch, None
    else:
        for s in samples:
            yield _singles(s), s


def _singles(sample) -> list:
    if not sample.more_questions:
        return [sample]
    return [sample.asking(q, i) for i, q in enumerate(sample.questions)]


def _eos_ids(bundle: ModelBundle) -> set[int]:
    eos = bundle.generate_kwargs.get("eos_token_id", getattr(bundle.model.generation_config, "eos_token_id", None))
    if eos is None:
        return set()
    if isinstance(eos, torch.Tensor):
        eos = eos.flatten().tolist()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _lengths(new_tokens: torch.Tensor, eos: set[int]) -> list[int]:
    """Tokens each row really generated: up to and including its first eos."""
    out = []
    for row in new_tokens.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in eos:
                n = i + 1
                break
        out.append(n)
    return out


def _texts(bundle: ModelBundle, tokens: torch.Tensor, lengths: list[int]) -> list[str]:
    return [bundle.decode(tokens[b : b + 1, :n])[0] for b, n in enumerate(lengths)]


def _diverged_text(bundle: ModelBundle, reference: torch.Tensor, logits: torch.Tensor, matched: int, n: int) -> str:
    """What free greedy decoding with the strategy starts with: the full cache's tokens up to the first
    disagreement, then the strategy's own token there (teacher forcing equals free decoding until then)."""
    tokens = reference[:matched]
    if matched < n:
        tokens = torch.cat([tokens, logits[matched].argmax(-1, keepdim=True).to(tokens.dtype)])
    return bundle.decode(tokens[None])[0]


# ----------------------------------------------------------------------------------------- helpers


def _strategy_name(strategy) -> str:
    """The registered name of a strategy instance (the preset whose defaults it matches best)."""
    from kvpress_mm.registry import list_strategies, strategy_class

    best, best_n = type(strategy).__name__, -1
    for name in list_strategies():
        cls, defaults = strategy_class(name)
        if cls is type(strategy) and all(getattr(strategy, k, None) == v for k, v in defaults.items()):
            if len(defaults) > best_n:
                best, best_n = name, len(defaults)
    return best


def _resolve(task, strategy):
    import kvpress_mm

    if isinstance(task, str):
        task = get_task(task)
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task or a task name, got {type(task).__name__}")
    if strategy is None:
        strategy = "full"
    if isinstance(strategy, str):
        name, strategy = strategy, kvpress_mm.get_strategy(strategy)
    else:
        if not callable(strategy) or not hasattr(strategy, "plan"):
            raise TypeError(f"strategy must be a strategy instance or a registered name, got {type(strategy).__name__}")
        name = _strategy_name(strategy)
    return task, strategy, name


def _place(bundle: ModelBundle, device) -> torch.device:
    if device is None:
        return bundle.device
    device = torch.device(device)
    if getattr(bundle.model, "hf_device_map", None) and len(set(bundle.model.hf_device_map.values())) > 1:
        raise ValueError("the model is spread over several devices (device_map); do not pass device= as well")
    if bundle.device != device:
        bundle.model.to(device)
    return bundle.device


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ----------------------------------------------------------------------------------------- a shared prefill


class _SharedUnit:
    """One generate unit's prefill, run once and shared by the full cache and every strategy of the unit
    (kvpress_mm.shared_prefill): question_aware, the whole prompt; question_agnostic, the context."""

    def __init__(self, bundle: ModelBundle, inputs: dict, device):
        self.bundle, self.inputs, self.device = bundle, inputs, device
        self._prefill = None
        self.seconds = 0.0
        self.peak_bytes: int | None = None

    @property
    def prefill(self):
        if self._prefill is None:
            from ..shared_prefill import SharedPrefill

            kwargs = {k: v for k, v in self.bundle.generate_kwargs.items() if k in ("pad_token_id", "eos_token_id")}
            with PeakMemory(self.device) as mem, ForwardTimer(self.bundle.model, self.device) as timer:
                self._prefill = SharedPrefill(self.bundle.model, self.inputs, **kwargs)
            self.seconds, self.peak_bytes = timer.prefill_seconds, mem.peak_bytes
        return self._prefill

    def compress(self, strategy):
        """(cache, report, seconds) of `strategy` (None: a plain copy of the full cache)."""
        prefill = self.prefill
        start = time.perf_counter()
        if strategy is None:
            cache, report = prefill.cache_copy(), None
        else:
            cache, session = prefill.compress(strategy)
            report = session.report
        return cache, report, time.perf_counter() - start


def _forced_rest(force, prompt_len: int):
    """(first forced token [B], a logits processor forcing the rest from the second new token on)."""
    from transformers import LogitsProcessorList

    if isinstance(force, list):
        first = torch.stack([row[0] for row in force])
        rest = ForcedTokens.from_rows([row[1:] for row in force], prompt_len + 1)
    else:
        first = force[:, 0]
        rest = ForcedTokens(force[:, 1:], prompt_len + 1)
    return first, LogitsProcessorList([rest])


def _generate_shared(
    bundle: ModelBundle, unit: _SharedUnit, strategy, max_new_tokens: int, device, force=None, logits: bool = False
) -> _Generation:
    """`_generate` on a shared prefill: the strategy compresses a copy of the unit's full cache, then the
    answer continues from the shared forward's last logits. prefill_seconds = the shared forward + this
    strategy's compression; decode = the continuation's generate."""
    prefill = unit.prefill
    kwargs = dict(bundle.generate_kwargs)
    first = None
    if force is not None:
        first, kwargs["logits_processor"] = _forced_rest(force, prefill.length)
    with PeakMemory(device) as mem, ForwardTimer(bundle.model, device) as timer:
        cache, report, seconds = unit.compress(strategy)
        tokens, raw = prefill.continue_generate(strategy, cache, max_new_tokens, first, logits, **kwargs)
    del cache
    return _Generation(
        new_tokens=tokens,
        logits=raw,
        prefill_seconds=unit.seconds + seconds,
        decode_seconds=_span(timer),
        decode_steps=timer.calls,
        peak_bytes=_max([unit.peak_bytes, mem.peak_bytes]),
        peak_increase_bytes=mem.increase_bytes,
        memory_method=mem.method,
        report=report,
    )


# ----------------------------------------------------------------------------------------- evaluate


class _Tally:
    """What one strategy's evaluation has gathered so far (records, sizes, timings, peaks)."""

    def __init__(self, strategy, name: str):
        self.strategy, self.name = strategy, name
        self.records: list[dict] = []
        self.acc = {"kept": 0.0, "before": 0.0, "after": 0.0, "rows": 0}
        self.times = {
            "prefill": [],
            "decode_s": 0.0,
            "decode_tok": 0,
            "full_prefill": [],
            "full_decode_s": 0.0,
            "full_decode_tok": 0,
        }
        self.peaks = {"peak": [], "inc": [], "full_peak": [], "full_inc": []}
        self.memory_method = "none"
        self.contexts = 0

    def add(self, done: list[dict], run: _Generation, full: _Generation | None, rows: int, agnostic: bool) -> None:
        """Count one complete generate unit (an interrupt before this point leaves no trace of it)."""
        if full is not None:
            self.times["full_prefill"].append(full.prefill_seconds)
            self.times["full_decode_s"] += full.decode_seconds
            self.times["full_decode_tok"] += full.decode_steps * rows
            self.peaks["full_peak"].append(full.peak_bytes)
            self.peaks["full_inc"].append(full.peak_increase_bytes)
        report = run.report
        kept = report.kept_fraction if report is not None else 1.0
        self.memory_method = run.memory_method
        self.times["prefill"].append(run.prefill_seconds)
        self.times["decode_s"] += run.decode_seconds
        self.times["decode_tok"] += run.decode_steps * rows
        self.peaks["peak"].append(run.peak_bytes)
        self.peaks["inc"].append(run.peak_increase_bytes)
        # per context: question_agnostic compresses one context for all its questions
        weight = 1 if agnostic else rows
        self.acc["kept"] += kept * weight
        self.acc["before"] += report.before_bytes if report is not None else 0
        self.acc["after"] += report.after_bytes if report is not None else 0
        self.acc["rows"] += weight
        self.contexts += 1 if agnostic else rows
        self.records.extend(done)


def evaluate(bundle: ModelBundle, task: Task | str, strategy, **options) -> RunResult:
    """Run every sample of `task` with `strategy` (an instance, a registered name, or None = "full") on
    `bundle`; with compare_full, also with the full cache on the same samples. See the module doc and
    `evaluate_many` for the options (share_prefill is False here unless asked for: each cache's own prefill)."""
    options.setdefault("share_prefill", False)
    try:
        return evaluate_many(bundle, task, [strategy], **options)[0]
    except EvaluationInterrupted as stop:
        raise EvaluationInterrupted(stop.results[0]) from None


def evaluate_many(
    bundle: ModelBundle,
    task: Task | str,
    strategies: list,
    *,
    batch_size: int = 1,
    compare_full: bool = True,
    progress: bool = True,
    device=None,
    protocol: str = "question_aware",
    likelihood: bool = False,
    share_prefill: bool = True,
) -> list[RunResult]:
    """`evaluate` for several strategies on the same samples: one RunResult per strategy, in order.

    protocol: "question_aware" (the question inside the compressed prompt) or "question_agnostic" (the
    context compressed alone, then each question asked on a copy; batch_size then batches one sample's
    questions). Every question of a sample (`Sample.questions`) is scored as a record of its own.

    likelihood (generate tasks, bundles with `encode`): also teacher-force each gold answer on both caches
    and record its log-likelihood under each and the mean next-token KL(full || strategy) over its tokens,
    continuous metrics that separate strategies where exact match is 0 or 1 for all (one more generate per
    batch and cache).

    share_prefill: run each batch's prefill once (the full cache's and every strategy's) and let each strategy
    compress its own copy of that forward's cache (kvpress_mm.shared_prefill): the same answers as separate
    runs up to float rounding, for a fraction of the time; prefill_seconds is then the shared forward plus the
    strategy's own compression. False: every cache runs its own generate (timings of a real run)."""
    check_int("evaluate", "batch_size", batch_size, minimum=1)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    if not strategies:
        raise ValueError("evaluate_many needs at least one strategy")
    resolved = [_resolve(task, s) for s in strategies]
    task = resolved[0][0]
    tallies = [_Tally(strategy, name) for _, strategy, name in resolved]
    device = _place(bundle, device)
    fidelity_mode = task.mode == "fidelity"
    run_full = compare_full or fidelity_mode
    eos = _eos_ids(bundle)
    samples = task.samples()
    t_start = time.perf_counter()

    n_questions = sum(len(s.questions) for s in samples)
    label = tallies[0].name if len(tallies) == 1 else f"{len(tallies)} strategies"
    bar = tqdm(total=n_questions, desc=f"{task.name} | {label}", unit="question", disable=not progress)
    interrupted = False
    try:
        for k, (batch, source) in enumerate(_units(samples, protocol, batch_size)):
            rows = len(batch)
            if source is None:  # question_aware: generate on the whole prompt
                inputs = bundle.prepare(batch)
                unit = _SharedUnit(bundle, inputs, device) if share_prefill else None

                def run_one(strategy, new_tokens, force=None, logits=False, inputs=inputs, unit=unit):
                    if unit is not None:
                        return _generate_shared(bundle, unit, strategy, new_tokens, device, force, logits)
                    return _generate(bundle, inputs, strategy, new_tokens, device, force=force, logits=logits)

                prompt_tokens = (
                    inputs["attention_mask"].sum(-1).tolist()
                    if "attention_mask" in inputs
                    else [inputs["input_ids"].shape[1]] * rows
                )
            else:  # question_agnostic: compress the context, then ask its questions
                split = split_questions(bundle, source)
                unit = _SharedUnit(bundle, split.context, device) if share_prefill else None

                def run_one(strategy, new_tokens, force=None, logits=False, split=split, unit=unit):
                    return _ask(bundle, split, strategy, new_tokens, device, force, logits, batch_size, unit)

                context_len = split.context["input_ids"].shape[1]
                prompt_tokens = [context_len + len(q) for q in split.questions]
            if k == 0 and WARMUP_NEW_TOKENS:
                run_one(None, WARMUP_NEW_TOKENS)
            full, full_len = None, None
            key = (
                id(bundle.model),
                bundle.name,
                json.dumps(task.config(), sort_keys=True, default=str),
                batch_size,
                k,
                fidelity_mode,
                protocol,
            )
            if run_full:
                full = _FULL_RUNS.get(key)
                if full is None:
                    full = run_one(None, task.max_new_tokens, logits=fidelity_mode)
                    _FULL_RUNS[key] = full
                full_len = _lengths(full.new_tokens, eos)
            for tally in tallies:
                strategy = tally.strategy
                if fidelity_mode:
                    run = run_one(strategy, task.max_new_tokens, force=full.new_tokens, logits=True)
                else:
                    run = run_one(strategy, task.max_new_tokens)
                kept = run.report.kept_fraction if run.report is not None else 1.0
                gold_stats = None
                if likelihood and not fidelity_mode and bundle.encode is not None and run_full:
                    gold_stats = _gold_answer_stats(bundle, batch, run_one, strategy, key, task.max_new_tokens)
                if fidelity_mode:
                    done = _fidelity_records(bundle, batch, full, run, full_len, prompt_tokens, kept)
                else:
                    done = _generate_records(bundle, task, batch, full, run, full_len, eos, prompt_tokens, kept)
                    if gold_stats:
                        for record, stats in zip(done, gold_stats):
                            record.update(stats)
                tally.add(done, run, full, rows, agnostic=source is not None)
            bar.update(rows)
            first = tallies[0]
            bar.set_postfix(
                score=f"{mean(r['score'] for r in first.records):.3f}",
                kept=f"{first.acc['kept'] / first.acc['rows']:.2f}",
            )
    except KeyboardInterrupt:
        interrupted = True  # Ctrl-C: the results of the samples finished so far go out with the interrupt
    finally:
        bar.close()

    results = [
        _result(
            bundle,
            task,
            tally,
            run_full=run_full,
            protocol=protocol,
            n_questions=n_questions,
            n_samples=len(samples),
            batch_size=batch_size,
            device=device,
            wall_seconds=time.perf_counter() - t_start,
            interrupted=interrupted,
            shared=share_prefill,
        )
        for tally in tallies
    ]
    if interrupted:
        raise EvaluationInterrupted(*results)
    return results


def _fidelity_records(bundle, batch, full, run, full_len, prompt_tokens, kept) -> list[dict]:
    reference = _texts(bundle, full.new_tokens, full_len)
    done = []
    for b, sample in enumerate(batch):
        n = full_len[b]
        m = fidelity_metrics(full.logits[b, :n], run.logits[b, :n])
        done.append(
            {
                "id": sample.id,
                "prompt_tokens": int(prompt_tokens[b]),
                "prediction": _diverged_text(bundle, full.new_tokens[b], run.logits[b], m["matched_prefix"], n),
                "full_prediction": reference[b],
                "answer": sample.answer,
                "score": m["agreement"],
                "full_score": 1.0,
                **m,
                "batch_kept_fraction": kept,
                "meta": sample.meta,
            }
        )
    return done


def _generate_records(bundle, task, batch, full, run, full_len, eos, prompt_tokens, kept) -> list[dict]:
    run_len = _lengths(run.new_tokens, eos)
    predictions = _texts(bundle, run.new_tokens, run_len)
    full_predictions = _texts(bundle, full.new_tokens, full_len) if full is not None else [None] * len(batch)
    return [
        {
            "id": sample.id,
            "prompt_tokens": int(prompt_tokens[b]),
            "prediction": predictions[b],
            "full_prediction": full_predictions[b],
            "answer": sample.answer,
            "score": task.score(sample, predictions[b]),
            "full_score": task.score(sample, full_predictions[b]) if full is not None else None,
            "batch_kept_fraction": kept,
            "meta": sample.meta,
        }
        for b, sample in enumerate(batch)
    ]


def _result(
    bundle,
    task,
    tally: _Tally,
    *,
    run_full,
    protocol,
    n_questions,
    n_samples,
    batch_size,
    device,
    wall_seconds,
    interrupted,
    shared,
) -> RunResult:
    records, acc, times, peaks = tally.records, tally.acc, tally.times, tally.peaks
    fidelity_mode = task.mode == "fidelity"
    n = len(records)
    metrics: dict = {}
    if fidelity_mode:
        for key in ("kl", "agreement", "prefix_agreement"):
            metrics[key] = mean(r[key] for r in records)
        metrics["steps_mean"] = mean(r["steps"] for r in records)
    notes = [bundle.notes]
    if fidelity_mode:
        notes.append(
            "fidelity: score = teacher-forced greedy agreement with the full cache; metrics.kl = mean "
            "KL(full || strategy) per generated token; full_score is 1 by definition."
        )
    if not run_full:
        notes.append("full-cache reference not run (compare_full=False).")
    if not bundle.trained:
        notes.append("random-weight model: task answers are meaningless, only fidelity measures something.")
    if protocol == "question_agnostic":
        notes.append(
            "question_agnostic: each context was compressed without its question, then every question was "
            "asked on a copy of the compressed cache (the full cache: the same steps, nothing evicted)."
        )
    if shared:
        notes.append(
            "share_prefill: each batch's prefill ran once for every cache; prefill_seconds = that forward + "
            "this strategy's own compression."
        )
    if interrupted:
        unit = "samples" if n_questions == n_samples else "questions"
        notes.append(f"interrupted after {len(records)} of {n_questions} {unit}.")
    full_scores = [r["full_score"] for r in records]
    scores = [r["score"] for r in records]
    if fidelity_mode:
        metrics["kl_ci"] = bootstrap_interval([r["kl"] for r in records])
    gold = [r for r in records if r.get("gold_logprob") is not None]
    if gold:
        drop = [r["full_gold_logprob"] - r["gold_logprob"] for r in gold]
        kl = [r["gold_kl"] for r in gold]
        metrics["gold_logprob"] = mean(r["gold_logprob"] for r in gold)
        metrics["full_gold_logprob"] = mean(r["full_gold_logprob"] for r in gold)
        metrics["gold_logprob_drop"] = mean(drop)
        metrics["gold_logprob_drop_ci"] = bootstrap_interval(drop)
        metrics["gold_kl"] = mean(kl)
        metrics["gold_kl_ci"] = bootstrap_interval(kl)
    strategy = tally.strategy
    return RunResult(
        model=bundle.name,
        task=task.name,
        strategy=tally.name,
        score=mean(scores),
        full_score=mean(full_scores) if run_full else None,
        kept_fraction=acc["kept"] / max(1, acc["rows"]),
        kv_bytes_before=acc["before"] / max(1, acc["rows"]),
        kv_bytes_after=acc["after"] / max(1, acc["rows"]),
        prefill_seconds=mean(times["prefill"]) or 0.0,
        decode_tokens_per_second=times["decode_tok"] / times["decode_s"] if times["decode_s"] > 0 else None,
        peak_memory_bytes=_max(peaks["peak"]),
        n_samples=n,
        samples=records,
        score_ci=score_interval(scores),
        full_score_ci=score_interval(full_scores) if run_full else None,
        vs_full=paired_comparison(scores, full_scores) if run_full else None,
        protocol=protocol,
        n_contexts=tally.contexts,
        notes=" ".join(x for x in notes if x),
        peak_memory_increase_bytes=_max(peaks["inc"]),
        full_prefill_seconds=mean(times["full_prefill"]),
        full_decode_tokens_per_second=(
            times["full_decode_tok"] / times["full_decode_s"] if times["full_decode_s"] > 0 else None
        ),
        full_peak_memory_bytes=_max(peaks["full_peak"]),
        full_peak_memory_increase_bytes=_max(peaks["full_inc"]),
        metrics=metrics,
        prompt_tokens_mean=mean(r["prompt_tokens"] for r in records) or 0.0,
        task_config=task.config(),
        strategy_config=dataclasses.asdict(strategy) if dataclasses.is_dataclass(strategy) else {},
        model_info=dict(bundle.info),
        batch_size=batch_size,
        device=str(device),
        memory_method=tally.memory_method,
        wall_seconds=wall_seconds,
        interrupted=interrupted,
    )


def _max(values) -> int | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None
