"""Compress once, ask many: prefill and compress a context (images + text, no question) once, then answer
several questions, each on its own copy of the compressed cache, without re-running the context's prefill.

    context = kvpress_mm.compress_context(model, strategy, inputs)        # inputs: a processor's output
    answers = context.ask([question_ids_1, question_ids_2], max_new_tokens=16)

The questions run as one batch (a copy of the cache per question, made by repeating its rows), or one by
one with batch_size=1. Each is appended to the context like a later chat turn: ids = context + question, the
positions continue from the context's, and the question itself is compressed only when the strategy's
`compress` is "every_prompt". Works for every supported family: the pixels are read once, at compression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .report import CompressionReport
from .validate import check_int

# per-token inputs that questions extend with zeros (text tokens): Qwen-VL's and Gemma3's type ids
TOKEN_INPUTS = ("mm_token_type_ids", "token_type_ids")


@dataclass
class Answer:
    """tokens: [T] the generated ids (up to max_new_tokens); logits: [T, vocab] float32 when asked for."""

    tokens: torch.Tensor
    logits: torch.Tensor | None = None


@dataclass
class CompressedContext:
    """A compressed context. cache: its CompressedCache (batch 1); inputs: its input_ids / attention_mask and
    per-token inputs; report: what compression did."""

    model: torch.nn.Module
    strategy: object
    cache: object
    inputs: dict
    report: CompressionReport

    @classmethod
    def of(cls, model, strategy, cache, inputs: dict, report: CompressionReport) -> CompressedContext:
        """A context from a cache `strategy` already compressed (e.g. from a shared prefill) and the inputs
        it was prefilled from (only the ids, mask and per-token inputs are kept)."""
        kept = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        kept.update({name: inputs[name] for name in TOKEN_INPUTS if name in inputs})
        return cls(model, strategy, cache, kept, report)

    @property
    def length(self) -> int:
        return self.inputs["input_ids"].shape[1]

    def ask(
        self,
        questions,
        max_new_tokens: int = 32,
        batch_size: int | None = None,
        output_logits: bool = False,
        forced: list | None = None,
        **generate_kwargs,
    ) -> list[Answer]:
        """Answer each question (1-D id tensors or lists of ids) on its own copy of the compressed cache.

        batch_size: questions per generate call (default: all at once); shorter questions are left-padded
        after the context (on models with sliding-window layers only questions of one length are batched).
        Greedy unless generate_kwargs say otherwise. Answers come back in the questions' order.
        forced: one 1-D id sequence per question to teacher-force as its answer (the logits are then the
        compressed cache's reading of that answer; after its end a row generates freely).
        """
        questions = [_as_ids(q, i) for i, q in enumerate(questions)]
        if not questions:
            return []
        if forced is not None:
            if len(forced) != len(questions):
                raise ValueError(f"ask: forced has {len(forced)} answers for {len(questions)} questions")
            forced = [torch.as_tensor(f, dtype=torch.long).flatten() for f in forced]
        if batch_size is None:
            batch_size = len(questions)
        check_int("ask", "batch_size", batch_size, minimum=1)
        answers: list[Answer | None] = [None] * len(questions)
        for group in self._batches(questions, batch_size):
            rows = [questions[i] for i in group]
            force = None if forced is None else [forced[i] for i in group]
            for i, answer in zip(group, self._ask_batch(rows, max_new_tokens, output_logits, force, generate_kwargs)):
                answers[i] = answer
        return answers

    def _batches(self, questions, batch_size: int) -> list[list[int]]:
        """Question indices per generate call. Sliding-window layers (Gemma3) count padding inside their
        window, so there only questions of one length share a call (padding would change the answers)."""
        from .adapters import adapter_for

        order = list(range(len(questions)))
        if not adapter_for(self.model).sliding_layers(self.model):
            return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        by_length: dict[int, list[int]] = {}
        for i in order:
            by_length.setdefault(len(questions[i]), []).append(i)
        return [same[i : i + batch_size] for same in by_length.values() for i in range(0, len(same), batch_size)]

    def _ask_batch(self, questions, max_new_tokens, output_logits, forced, generate_kwargs) -> list[Answer]:
        n = len(questions)
        device = self.inputs["input_ids"].device
        width = max(len(q) for q in questions)
        pad_id = _pad_id(self.model)
        new_ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
        new_mask = torch.zeros((n, width), dtype=self.inputs["attention_mask"].dtype, device=device)
        for row, q in enumerate(questions):
            new_ids[row, width - len(q) :] = q.to(device)
            new_mask[row, width - len(q) :] = 1
        inputs = {
            "input_ids": torch.cat([self.inputs["input_ids"].expand(n, -1), new_ids], dim=1),
            "attention_mask": torch.cat([self.inputs["attention_mask"].expand(n, -1), new_mask], dim=1),
        }
        for name in TOKEN_INPUTS:
            if name in self.inputs:
                context = self.inputs[name].expand(n, -1)
                inputs[name] = torch.cat([context, context.new_zeros((n, width))], dim=1)
        cache = self.cache.fork()
        if n > 1:
            cache.batch_repeat_interleave(n)
        kwargs = {"do_sample": False, **generate_kwargs}
        if forced is not None:
            from transformers import LogitsProcessorList

            processors = list(kwargs.pop("logits_processor", None) or [])
            kwargs["logits_processor"] = LogitsProcessorList(
                [*processors, ForcedTokens.from_rows(forced, inputs["input_ids"].shape[1])]
            )
        with self.strategy(self.model):  # inside it the cache brings its M-RoPE offset (Qwen-VL)
            out = self.model.generate(
                **inputs,
                cache=cache,
                max_new_tokens=max_new_tokens,
                return_dict_in_generate=True,
                output_logits=output_logits,
                **kwargs,
            )
        tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        logits = torch.stack(out.logits, dim=1).float() if output_logits else None
        return [Answer(tokens[i], None if logits is None else logits[i]) for i in range(n)]


class ForcedTokens:
    """Logits processor: at step t, row b may only emit tokens[b, t] while t < lengths[b] (teacher forcing
    through generate, so positions, masks and the compressed cache are generate's own)."""

    def __init__(self, tokens: torch.Tensor, prompt_len: int, lengths: torch.Tensor | None = None):
        self.tokens = tokens
        self.prompt_len = prompt_len
        self.lengths = torch.full((tokens.shape[0],), tokens.shape[1]) if lengths is None else lengths

    @classmethod
    def from_rows(cls, rows: list[torch.Tensor], prompt_len: int) -> ForcedTokens:
        width = max(1, max(len(r) for r in rows))
        tokens = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = r
        return cls(tokens, prompt_len, torch.tensor([len(r) for r in rows]))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        if step >= self.tokens.shape[1]:
            return scores
        active = (self.lengths > step).to(scores.device)
        forced = torch.full_like(scores, -torch.inf)
        forced.scatter_(1, self.tokens[:, step : step + 1].to(scores.device), 0.0)
        return torch.where(active[:, None], forced, scores)


def compress_context(model: torch.nn.Module, strategy, inputs: dict) -> CompressedContext:
    """Prefill `inputs` (batch 1: one context) under `strategy` and keep its compressed cache."""
    ids = inputs.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.shape[0] != 1:
        shape = None if ids is None else tuple(ids.shape)
        raise ValueError(f"compress_context needs input_ids of one context, shape [1, L]; got {shape}")
    mask = inputs.get("attention_mask")
    if mask is None:
        inputs = {**inputs, "attention_mask": torch.ones_like(ids)}
    with strategy(model) as session, torch.no_grad():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    return CompressedContext.of(model, strategy, cache, inputs, session.report)


def _as_ids(question, i: int) -> torch.Tensor:
    ids = torch.as_tensor(question, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"question {i}: expected a non-empty 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    return ids


def _pad_id(model) -> int:
    config = getattr(model, "generation_config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0
