"""One prefill, many strategies: run a prompt's forward once, then let each strategy compress its own copy.

Compression changes only what later steps read: a prompt's forward computes the same activations whatever
the strategy (each layer's attention reads the whole prompt; the cache is compacted after it). So a sweep
over strategies and budgets needs one forward per prompt, not one per strategy:

    prefill = SharedPrefill(model, inputs)              # the forward, its full cache, its attention calls
    cache, report = prefill.compress(strategy)          # this strategy's compressed copy of the cache
    tokens = prefill.continue_generate(strategy, cache, max_new_tokens=16)

`compress` hands the forward's recorded attention calls (each managed layer's post-RoPE queries, mask and
attention kwargs; the keys and values come from the copy) to the strategy's own session in layer order, so
its statistics, budgets (cross-layer ones included), replays (KVzip) and compaction run exactly as inside
that strategy's own prefill, without the projections, MLPs or vision tower. The one difference: a
strategy's own forward may compute some layers' attention output with its statistics pass instead of the
model's kernel, which moves later layers' keys by float rounding, so results equal separate runs up to
rounding (tests/test_shared_prefill.py), not bit for bit.

Continuing: the first new token comes from the shared forward's last logits; the rest from `generate` on
the compressed copy, which feeds only the new token (the cache stands for the whole prompt).

Memory: the full cache plus every managed layer's queries ([B, H, L, D] each) live as long as the object.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .adapters import adapter_for
from .context import TOKEN_INPUTS
from .hooks import Hooks


@dataclass
class AttentionCall:
    """One managed layer's attention call in the shared forward (keys and values are the cache's)."""

    base: object  # the model's own attention function
    module: torch.nn.Module
    query: torch.Tensor  # [B, H, L, D] after RoPE
    mask: torch.Tensor | None
    kwargs: dict


class _Recorder:
    """A session stand-in for `Hooks`: records the forward's inputs and every attention call, changes nothing."""

    def __init__(self):
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.calls: dict[int, AttentionCall] = {}
        self.forwards = 0

    def attention(self, base, module, query, key, value, attention_mask, **kwargs):
        self.calls[module.layer_idx] = AttentionCall(base, module, query, attention_mask, dict(kwargs))
        return base(module, query, key, value, attention_mask, **kwargs)

    def before_forward(self, module, args, kwargs):
        self.forwards += 1
        # the cache is the prefill's result, not an input: a strategy's session must see a first prompt
        self.args = args
        self.kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}

    def after_forward(self, module, args, kwargs, output):
        return None

    def after_attention(self, module, args, kwargs, output):
        return None


class SharedPrefill:
    """The forward of `inputs` (a processor's output, left-padded if batched) with the full cache: generate's
    own prefill step (generate_kwargs: e.g. pad_token_id), so positions and masks are those of a normal run.

    logits: [B, vocab] float32 at the last position; cache: the full DynamicCache (never modified: each
    strategy compresses a copy); calls: layer -> AttentionCall; rope_deltas: Qwen-VL's M-RoPE offset or None.
    """

    def __init__(self, model: torch.nn.Module, inputs: dict, **generate_kwargs):
        ids = inputs.get("input_ids")
        if ids is None or ids.dim() != 2:
            raise ValueError(f"SharedPrefill needs input_ids of shape [B, L]; got {None if ids is None else ids.shape}")
        self.model = model
        self.inputs = dict(inputs)
        if self.inputs.get("attention_mask") is None:
            self.inputs["attention_mask"] = torch.ones_like(ids)
        adapter = adapter_for(model)
        decoder = adapter.decoder(model)
        recorder = _Recorder()
        hooks = Hooks(model, decoder, adapter.attention_modules(model))
        hooks.install(recorder, recorder.before_forward, recorder.after_forward, recorder.after_attention)
        try:
            # generate's own prefill (its position ids for padded rows, its cache): one step, no decode
            out = model.generate(
                **self.inputs,
                **generate_kwargs,
                max_new_tokens=1,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
        finally:
            hooks.remove(recorder)
        if recorder.forwards != 1:
            raise RuntimeError(f"SharedPrefill expected one forward of the prompt, saw {recorder.forwards}")
        self.logits = out.logits[0].float()
        self.cache = out.cache
        self.calls = recorder.calls
        self.forward_args, self.forward_kwargs = recorder.args, recorder.kwargs
        self.rope_deltas = _rope_owner_deltas(model)
        if self.rope_deltas is not None:
            self.rope_deltas = self.rope_deltas.clone()

    @property
    def length(self) -> int:
        return self.inputs["input_ids"].shape[1]

    def cache_copy(self):
        """An independent copy of the full cache."""
        return copy.deepcopy(self.cache)

    def compress(self, strategy):
        """(cache, session): `strategy`'s compressed copy of the full cache, as its own prefill would have made
        it, and the session that made it (`.report`, `.kept`)."""
        session = strategy(self.model)
        cache = self.cache_copy()
        with self.model_offset():
            session.compress_prefilled(cache, self)
        if self.rope_deltas is not None:
            cache.rope_deltas = self.rope_deltas.clone()
        return cache, session

    @contextmanager
    def model_offset(self, rows: int | None = None):
        """Qwen-VL reads the prompt's M-RoPE offset from the model: give it this prompt's while inside."""
        owner = _rope_owner(self.model)
        if self.rope_deltas is None or owner is None:
            yield
            return
        saved = owner.rope_deltas
        deltas = self.rope_deltas
        owner.rope_deltas = deltas if rows is None else deltas.repeat_interleave(rows // deltas.shape[0], dim=0)
        try:
            yield
        finally:
            owner.rope_deltas = saved

    def continue_generate(
        self,
        strategy,
        cache,
        max_new_tokens: int,
        first: torch.Tensor | None = None,
        output_logits: bool = False,
        **generate_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens [B, T], logits [B, T, vocab] float32 or None): greedy continuation of the prompt on `cache`
        (a copy `compress` made; strategy None: a plain copy of the full cache, no strategy context).

        first: [B] the first new token (default: the argmax of the shared logits); generate_kwargs may carry
        a logits_processor for the later steps (teacher forcing: their step 0 is the second new token)."""
        if first is None:
            first = self.logits.argmax(-1)
        first = first.to(self.inputs["input_ids"].device)[:, None]
        logits = self.logits[:, None] if output_logits else None
        if max_new_tokens <= 1:
            return first[:, :max_new_tokens].cpu(), None if logits is None else logits[:, :max_new_tokens].cpu()
        inputs = {
            "input_ids": torch.cat([self.inputs["input_ids"], first], 1),
            "attention_mask": torch.cat([self.inputs["attention_mask"], torch.ones_like(first)], 1),
        }
        for name in TOKEN_INPUTS:
            if name in self.inputs:
                inputs[name] = torch.cat([self.inputs[name], torch.zeros_like(first)], 1)
        context = strategy(self.model) if strategy is not None else _nothing()
        with context, self.model_offset():
            out = self.model.generate(
                **inputs,
                cache=cache,
                max_new_tokens=max_new_tokens - 1,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=output_logits,
                **generate_kwargs,
            )
        tokens = torch.cat([first, out.sequences[:, inputs["input_ids"].shape[1] :]], 1).cpu()
        if output_logits:
            logits = torch.cat([logits, torch.stack(out.logits, 1).float()], 1).cpu()
        return tokens, logits


@contextmanager
def _nothing():
    yield None


def _rope_owner(model):
    return next(
        (m for m in (model, getattr(model, "model", None)) if m is not None and hasattr(m, "rope_deltas")), None
    )


def _rope_owner_deltas(model):
    owner = _rope_owner(model)
    deltas = getattr(owner, "rope_deltas", None) if owner is not None else None
    return deltas if isinstance(deltas, torch.Tensor) else None
