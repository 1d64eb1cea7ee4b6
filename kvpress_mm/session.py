"""The context manager behind `with strategy(model):`; it orchestrates, the work is done elsewhere.

    hooks.py        installing / removing the attention wrapper and forward hooks
    prompt.py       the prompt being prefilled: labels, real positions, kept counts
    statistics.py   the attention statistics the strategy declared
    compaction.py   the strategy's plan applied to a layer; compressed_cache.py: the layer it becomes
    layer_state.py  decode masks of a compacted layer;   report.py: what compression did
    allocation.py   cross-layer budgets;                 replay.py: a replay strategy's rounds

Per forward: the model's pre-hook decides what this forward is (a first prompt, a later prompt to
compress, or a step to read through decode masks); the attention wrapper computes statistics on
prompts and gives compacted layers their masks; the attention module's hook compacts its layer.
What a later call needs (logical length, slot positions, masks) lives on the cache, not here.

Cross-layer budgets (allocation.py): a strategy with `budget_scope = "model"` allocates its layers' kept counts
from every layer's statistics (`layer_summary(layer)` per layer, then `allocate(summaries, n_valid, num_layers)`,
which must keep in all what the uniform budget rule would). Its layers are compacted only once the last managed
layer of the prompt has run: until then each layer's cache and statistics are held (memory: the statistics
of all layers, [B, H, S] sums / [B, H, Q, S] windows each, live until the prompt's end).

Layouts (`layout`; "auto", the default, is "flat" for head-wise budgets, else "padded"; compressed_cache.py):
with "flat" each compacted layer that has padding slots (head-wise budgets, the rows of a padded batch) is stored
as a FlatLayer when its forward ends, and the attention wrapper computes a flat layer's attention itself
(flat_attention.py). A later prompt compressed on a flat layer reads (and is compacted on) its padded form,
flattened again at the forward's end.

Replays: a strategy with a method `replay_rounds` (kvpress_mm/replay.py) has a cache's first prompt compacted
only after that prompt's forward: the model's post-forward hook runs the strategy's replay rounds through the
text decoder on the uncompressed cache (the hooks see them as a replay: statistics, no compaction), restores
the cache, then compacts every layer with the replay's statistics. Later prompts are appended as they are.
"""

from __future__ import annotations

import logging

import torch

from .adapters import adapter_for
from .allocation import allocate_counts
from .cache_ops import layer_bytes
from .compaction import compress_decode, compress_first_prompt, compress_later_prompt, past_state
from .compressed_cache import CompressedCache, CompressedLayer, FlatLayer, as_compressed, check_cache, resolve_layout
from .flat_attention import flat_attention
from .hooks import SUPPORTED_BACKENDS, Hooks
from .modality import modality_from_ids
from .prompt import Prompt
from .replay import record_round, run_replay
from .report import CompressionReport, LayerReport
from .statistics import LayerStats, Statistics

logger = logging.getLogger("kvpress_mm")

# models whose uncompressed sliding-window layers were already reported
_SLIDING_LOGGED: set[int] = set()

__all__ = ["CompressionSession", "SUPPORTED_BACKENDS"]


def _no_output(*args, **kwargs):
    """An attention function for a replayed prompt whose output is already known (compress_prefilled)."""
    return None, None


def _cache_from(kwargs: dict):
    for name in ("cache", "past_key_values", "past_key_value"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


class CompressionSession:
    """Compresses `model`'s KV cache with `strategy` at the end of every prompt while active.

    report: what the last compressed prompt's compression did, per layer.
    kept: layer -> bool [B, 1|Hkv, L] prompt positions kept by the first prompt's compression.
    states: layer -> LayerState of the cache last seen (its compacted layout).
    layout: "padded" or "flat", from the `layout` given ("auto", "padded", "flat"; None: the environment's
    KVPRESS_MM_LAYOUT, else "auto": flat for head-wise budgets without decode-phase compression; compressed_cache.py).
    """

    def __init__(self, strategy, model: torch.nn.Module, layout: str | None = None):
        self.strategy = strategy
        self.layout = resolve_layout(layout, strategy)
        self.model = model
        self.adapter = adapter_for(model)
        self.decoder = self.adapter.decoder(model)
        self.attention_modules = self.adapter.attention_modules(model)
        self.sliding = self.adapter.sliding_layers(model)
        self.managed = frozenset(self.attention_modules) - self.sliding
        self.num_layers = len(self.attention_modules)
        self.needs = strategy.needs()
        self.decode_every = strategy.decode_interval()
        if self.layout == "flat" and self.decode_every:
            phase = getattr(strategy, "phase", "decode")
            raise ValueError(
                f"{type(strategy).__name__}: layout='flat' cannot compress while decoding (phase={phase!r}): "
                "decode-phase eviction rewrites the padded layout; use layout='padded'"
            )
        self.compress_mode = strategy.compress
        # "model": the layers' budgets are allocated together at the prompt's end (see the module docstring)
        self.model_scope = getattr(strategy, "budget_scope", "layer") == "model"
        self.deferred: dict[int, LayerStats] = {}
        # a replay strategy (see the module docstring): the prompt forward's positions / mask, and the replay's
        # statistics while it runs (layer -> [B, H, L] maxima), kept after it for inspection
        self.replays = callable(getattr(strategy, "replay_rounds", None))
        self._prompt_inputs: tuple | None = None
        self._round = None
        self.replay_scores: dict[int, torch.Tensor] = {}
        if self.adapter.multimodal:
            self.adapter.token_ids(model)  # fail now, not mid-generate, if the image token id is missing
        self.hooks = Hooks(model, self.decoder, self.attention_modules)
        self.backend = None
        self.report = CompressionReport()
        self.kept: dict[int, torch.Tensor] = {}
        self.cache = None  # the cache of the current forward
        self.prompt: Prompt | None = None
        self.stats: Statistics | None = None
        self.pending: dict[int, LayerStats] = {}
        self.decode_mask_2d: torch.Tensor | None = None
        self._layout_changed = False  # a layer was compacted in this forward: the cache's summary is stale
        self._active = False

    # ------------------------------------------------------------------ install / remove
    def __enter__(self) -> CompressionSession:
        if self._active:
            raise RuntimeError("this model is already inside a kvpress-mm strategy context; contexts do not nest")
        self.backend = self.hooks.install(self, self._before_forward, self._after_forward, self._after_attention)
        if self.sliding and id(self.model) not in _SLIDING_LOGGED:
            _SLIDING_LOGGED.add(id(self.model))
            logger.info(
                "%s: %d sliding-window layers are left uncompressed (%s)",
                self.adapter.family,
                len(self.sliding),
                sorted(self.sliding),
            )
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.hooks.remove(self)
        if exc_type is None:
            self._end_forward()
        else:  # raised mid-forward (plan, Ctrl-C): the cache may be half compacted; let the error through
            self._drop_forward()
        self._round = None
        self._prompt_inputs = None
        self.prompt = None
        self.pending.clear()
        self.deferred.clear()
        self._active = False

    @property
    def compressed_any(self) -> bool:
        """Whether the last cache seen holds a compacted layer."""
        return bool(getattr(self.cache, "compacted", False))

    @property
    def states(self) -> dict:
        layers = getattr(self.cache, "layers", ())
        return {i: layer.state for i, layer in enumerate(layers) if isinstance(layer, CompressedLayer)}

    # ------------------------------------------------------------------ per forward
    def _before_forward(self, module, args, kwargs):
        if self._round is not None:
            raise RuntimeError("the model was called from inside a kvpress-mm replay")
        cache = _cache_from(kwargs)
        if cache is None and kwargs.get("use_cache", getattr(self.decoder.config, "use_cache", True)) is False:
            raise ValueError(
                "kvpress-mm compresses the KV cache, but this forward runs without one (use_cache=False), so "
                "nothing would be compressed; generate with use_cache=True inside the strategy context"
            )
        if cache is not None:
            check_cache(cache)
        self.cache = cache
        self.pending.clear()
        self.deferred.clear()
        mask = kwargs.get("attention_mask")
        mask_2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        past = 0 if cache is None else cache.get_seq_length()
        new_tokens = self._input_length(args, kwargs)
        if past == 0:
            self._start_prompt(args, kwargs, mask_2d, first=True)
        elif (
            new_tokens > 1
            and not self.replays
            and (self.compress_mode == "every_prompt" or not self._holds_layout(cache))
        ):
            self._start_prompt(args, kwargs, None if mask_2d is None else mask_2d[:, -new_tokens:], first=False)
        else:
            self.prompt = None
        # an all-real mask (the usual case) needs no per-layer tail: checked once per step here (a first
        # prompt needs none: nothing is compacted while it runs)
        tail_needed = past > 0 and mask_2d is not None
        self.decode_mask_2d = mask_2d if tail_needed and not bool(mask_2d.all()) else None
        if isinstance(cache, CompressedCache):
            cache.attended = True
        self._prompt_inputs = None
        if self.replays and self.prompt is not None:
            self._prompt_inputs = (kwargs.get("position_ids"), mask_2d)

    def _after_forward(self, module, args, kwargs, output):
        try:
            if self._prompt_inputs is not None and self.deferred and output is not None:
                self._replay()
        finally:
            self._prompt_inputs = None
            if output is None:  # the forward raised (torch still calls this hook): see _drop_forward
                self._drop_forward()
            else:
                self._end_forward()

    def _end_forward(self) -> None:
        if isinstance(self.cache, CompressedCache):
            if self._layout_changed:
                self.cache.refresh_layout(self.managed)
                if self.layout == "flat":
                    for idx in self.cache.flatten(self.managed):
                        if idx in self.report.layers:
                            self.report.layers[idx].after_bytes = self.cache.layers[idx].kv_bytes()
            self.cache.attended = False
        self._layout_changed = False

    def _drop_forward(self) -> None:
        """The forward's end after an exception: its later layers may still be plain, so the layout is not
        refreshed (that would raise an error of its own and hide the real one); the forward's state is dropped."""
        if isinstance(self.cache, CompressedCache):
            self.cache.attended = False
        self._layout_changed = False
        self.pending.clear()
        self.deferred.clear()

    def _holds_layout(self, cache) -> bool:
        layers = cache.layers
        return any(isinstance(layers[i], CompressedLayer) for i in self.managed if i < len(layers))

    @staticmethod
    def _input_length(args, kwargs) -> int:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        return 0 if ids is None else ids.shape[1]

    def _start_prompt(self, args, kwargs, attention_mask, first: bool) -> None:
        self.prompt = None
        self.stats = Statistics(self.needs, eager=self.backend == "eager")
        self.report = CompressionReport()
        if first:
            self.kept = {}
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            modality = self.adapter.modality(self.model, input_ids, attention_mask, kwargs)
        else:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                return
            if self.adapter.multimodal:
                logger.warning("prompt given as inputs_embeds without input_ids: every position is treated as text")
            fake_ids = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            modality = modality_from_ids(fake_ids, attention_mask)
        self.prompt = Prompt(modality, self.strategy, self.num_layers, first, input_ids)

    # ------------------------------------------------------------------ the attention wrapper
    def attention(self, base, module, query, key, value, attention_mask, **kwargs):
        idx = module.layer_idx
        if idx not in self.managed:
            return base(module, query, key, value, attention_mask, **kwargs)
        if self._round is not None:
            record_round(self.replay_scores, idx, query, key, kwargs.get("scaling"), self._round)
            return base(module, query, key, value, attention_mask, **kwargs)
        prompt = self.prompt
        layer = self._layer(idx)
        if isinstance(layer, FlatLayer):
            if prompt is None:
                return self._flat_attention(module, query, key, value, layer, kwargs)
            # a later prompt compressed at this forward's end: statistics and compaction read the padded form
            layer = self.cache.layers[idx] = layer.padded()
            key, value = layer.keys, layer.values
        compacted = self.compressed_any
        if compacted and isinstance(layer, CompressedLayer):
            # every managed layer reads its own layout: one mask for all layers cannot express them
            attention_mask = layer.state.decode_mask(query, key, self.decode_mask_2d, eager=self.backend == "eager")
        if prompt is not None and query.shape[2] == prompt.length > 1:
            device = query.device
            if self.needs.any and (self.decode_every or prompt.evicts(idx, device)):
                key_modality = None
                if self.needs.key_modality and key.shape[2] > prompt.length:
                    key_modality = self._key_modality(layer, key.shape[2], device)
                result, stats = self.stats.prompt_attention(
                    base, module, query, key, value, attention_mask, prompt.on(device), kwargs, key_modality
                )
                stats.token_ids = prompt.ids_on(device)
                self.pending[idx] = stats
                return result
            return base(module, query, key, value, attention_mask, **kwargs)
        if isinstance(layer, CompressedLayer) and layer.state.scores is not None:
            layer.state.add_scores(Statistics.decode_probs(query, key, attention_mask, kwargs))
        return base(module, query, key, value, attention_mask, **kwargs)

    def _flat_attention(self, module, query, key, value, layer: FlatLayer, kwargs):
        if self.decode_every:
            raise ValueError(
                f"{type(self.strategy).__name__} compresses while decoding, which needs the padded layout; this "
                "cache holds flat layers (layout='flat'): continue it with a strategy that compresses prompts only"
            )
        return flat_attention(module, query, layer, key, value, self.decode_mask_2d, self.backend == "eager", **kwargs)

    def _key_modality(self, layer, length: int, device) -> torch.Tensor:
        """[B, S] labels of a later prompt's keys: the compressed past's slots, then the prompt's tokens."""
        n = self.prompt.length
        mask = self.decode_mask_2d
        past_mask = None if mask is None else mask[:, :-n]
        past = past_state(layer, length - n, past_mask).current_modality(length - n, past_mask, device)
        return torch.cat([past, self.prompt.on(device)[0]], dim=-1)

    def _layer(self, idx: int):
        cache = self.cache
        if cache is None or idx >= len(cache.layers):
            return None
        return cache.layers[idx]

    # ------------------------------------------------------------------ compaction
    def _after_attention(self, module, args, kwargs, output):
        idx = module.layer_idx
        if self._round is not None:
            return
        stats = self.pending.pop(idx, None)
        cache = _cache_from(kwargs)
        if cache is None or self.prompt is None and not self.decode_every:
            return
        if self.cache is None:  # the model made the cache inside its forward
            check_cache(cache)
            self.cache = cache
        layer = cache.layers[idx]
        keys = getattr(layer, "keys", None)
        if keys is None or keys.dim() != 4:
            return
        if idx not in self.managed:
            # sliding-window layers stay as they are; the report still counts their bytes
            if self.prompt is not None and idx not in self.report.layers:
                size, nbytes = keys.shape[2], layer_bytes(keys, layer.values)
                self.report.layers[idx] = LayerReport(size, size, nbytes, nbytes, None)
            return
        prompt = self.prompt
        if prompt is not None and idx not in self.report.layers:
            if stats is None:
                stats = LayerStats(token_ids=prompt.ids_on(keys.device))
            if self.model_scope or self._prompt_inputs is not None:
                self._defer(cache, idx, stats)
            else:
                self._compress_prompt(cache, idx, layer, stats)
        elif prompt is None and isinstance(layer, CompressedLayer):
            if compress_decode(
                self.strategy,
                layer,
                idx,
                self.num_layers,
                self._query_heads(idx),
                self.decode_mask_2d,
                self.decode_every,
            ):
                cache.compacted = True
                self._layout_changed = True

    def _query_heads(self, idx: int) -> int:
        return self.attention_modules[idx].config.num_attention_heads

    def _compress_prompt(self, cache, idx: int, layer, stats) -> None:
        prompt = self.prompt
        cache = as_compressed(cache)
        track = self.decode_every and self.needs.accumulated
        if layer.keys.shape[2] == prompt.length and not isinstance(layer, CompressedLayer):
            new, report, keep = compress_first_prompt(
                self.strategy, layer, idx, self.num_layers, self._query_heads(idx), prompt, stats, track
            )
            if prompt.first:
                self.kept[idx] = keep
        else:
            mask_2d = self.decode_mask_2d
            new, report = compress_later_prompt(
                self.strategy, layer, idx, self.num_layers, self._query_heads(idx), prompt, stats, mask_2d
            )
        cache.layers[idx] = new
        self.report.layers[idx] = report
        if new.state.compacted:
            cache.compacted = True
        self._layout_changed = True
        if prompt.first and idx == max(self.managed):
            cache.rope_deltas = self._rope_deltas()

    # ------------------------------------------------------------------ a prefill shared by strategies
    def compress_prefilled(self, cache, prefill) -> None:
        """Compress `cache`, a copy of the full cache of `prefill` (a shared_prefill.SharedPrefill: a first
        prompt's forward that already ran), as this strategy's own prefill would have: the forward's attention
        calls go through this session layer by layer (statistics, budgets, compaction, replays)."""
        with self:
            self._before_forward(self.model, prefill.forward_args, prefill.forward_kwargs)
            self.cache = cache
            for idx in sorted(self.attention_modules):
                call, layer = prefill.calls.get(idx), cache.layers[idx]
                if call is not None and idx in self.managed:
                    # the forward's output is known: only eager statistics need the model's attention again
                    base = call.base if self.backend == "eager" else _no_output
                    self.attention(base, call.module, call.query, layer.keys, layer.values, call.mask, **call.kwargs)
                self._after_attention(self.attention_modules[idx], (), {"past_key_values": cache}, None)
            self._after_forward(self.model, (), {}, cache)  # a replay strategy's rounds run here

    # ------------------------------------------------------------------ cross-layer budgets
    def _defer(self, cache, idx: int, stats: LayerStats) -> None:
        """Hold layer idx until the last managed layer has run, then allocate and compact them all."""
        self.deferred[idx] = stats.trimmed()
        if idx == max(self.managed) and self._prompt_inputs is None:
            self._compress_deferred(cache)

    def _compress_deferred(self, cache) -> None:
        deferred, self.deferred = self.deferred, {}
        order = sorted(deferred)
        prompt = self.prompt
        device = cache.layers[order[0]].keys.device
        uniform = prompt.keep_counts(order[0], device)
        if self.model_scope and any(prompt.evicts(i, cache.layers[i].keys.device) for i in order):
            args = (cache, order, deferred, uniform, self.num_layers, self._query_heads)
            prompt.set_keep_counts(allocate_counts(self.strategy, prompt, *args))
        for i in order:
            self._compress_prompt(cache, i, cache.layers[i], deferred[i])

    # ------------------------------------------------------------------ replays
    def _replay(self) -> None:
        """Run the strategy's replay rounds on the prompt's uncompressed cache, then compact every held layer."""
        prompt_inputs, self._prompt_inputs = self._prompt_inputs, None
        self.replay_scores = {}
        self.deferred = run_replay(
            self.strategy,
            self.model,
            self.decoder,
            self.prompt,
            self.cache,
            prompt_inputs,
            self._rope_deltas(),
            self.deferred,
            self.replay_scores,
            self._query_heads,
            self._set_round,
        )
        self._compress_deferred(self.cache)

    def _set_round(self, rnd) -> None:
        self._round = rnd

    def _rope_deltas(self):
        """Qwen-VL's M-RoPE offset of the prompt (kept with the cache for later calls), else None."""
        for module in (self.model, getattr(self.model, "model", None)):
            deltas = getattr(module, "rope_deltas", None)
            if isinstance(deltas, torch.Tensor):
                return deltas.clone()
        return None
