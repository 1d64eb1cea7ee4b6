"""The context manager behind `with strategy(model):` - hooks, statistics, compression, decode masks.

While active, the text decoder's attention implementation is switched to a registered wrapper of the
model's own one (`kvpress_mm_sdpa` / `kvpress_mm_eager`). The wrapper computes the statistics a
strategy asked for during prefill and, once a layer's cache is compacted, gives that layer's decode
steps a mask matching its compacted layout. Everything is undone on exit, also after an exception.
"""

from __future__ import annotations

import logging
import sys

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .adapters import adapter_for
from .backend import set_decoder_attention
from .attention_stats import (
    accumulated_attention,
    allowed_from_mask,
    attention_with_accumulated,
    causal_with_key_padding,
    hides_future,
    window_attention,
)
from .cache_ops import layer_bytes
from .layer_state import LayerState, apply_index, compacted_state
from .layer import LayerKV, Plan
from .modality import Modality, modality_from_ids
from .report import CompressionReport, LayerReport

logger = logging.getLogger("kvpress_mm")

SUPPORTED_BACKENDS = ("sdpa", "eager")
# attention kwargs that do not change what plain causal attention computes
_PLAIN_KWARGS = {"dropout", "scaling", "position_ids", "use_cache", "output_attentions", "is_causal", "logits_to_keep"}

# id(attention module) -> the session compressing it
_ACTIVE: dict[int, "CompressionSession"] = {}
# models whose uncompressed sliding-window layers were already reported
_SLIDING_LOGGED: set[int] = set()


def _wrapper_name(backend: str) -> str:
    return f"kvpress_mm_{backend}"


def _base_attention(backend: str, module: torch.nn.Module):
    if backend == "eager":
        # every transformers modeling file defines its own eager function (softcap, sinks, ...)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[backend]


def _register_wrapper(backend: str) -> str:
    name = _wrapper_name(backend)
    if name not in AttentionInterface._global_mapping:

        def attention(module, query, key, value, attention_mask, **kwargs):
            base = _base_attention(backend, module)
            session = _ACTIVE.get(id(module))
            if session is None:
                return base(module, query, key, value, attention_mask, **kwargs)
            return session.attention(base, module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[backend])
    return name


def _cache_from(kwargs: dict):
    for name in ("cache", "past_key_values", "past_key_value"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


class CompressionSession:
    """Compresses `model`'s KV cache with `strategy` at the end of every prefill while active."""

    def __init__(self, strategy, model: torch.nn.Module):
        self.strategy = strategy
        self.model = model
        self.adapter = adapter_for(model)
        self.decoder = self.adapter.decoder(model)
        self.attention_modules = self.adapter.attention_modules(model)
        self.sliding = self.adapter.sliding_layers(model)
        self.managed = frozenset(self.attention_modules) - self.sliding
        self.num_layers = len(self.attention_modules)
        self.backend = None  # the decoder's own attention implementation, read on entry
        self.needs = strategy.needs()
        self.decode_every = strategy.decode_interval()
        if self.adapter.multimodal:
            self.adapter.token_ids(model)  # fail now, not mid-generate, if the image token id is missing
        self.report = CompressionReport()
        self._handles: list = []
        self._active = False
        self._reset_prompt()

    # ------------------------------------------------------------------ install / remove
    def __enter__(self) -> "CompressionSession":
        if self._active or any(id(m) in _ACTIVE for m in self.attention_modules.values()):
            raise RuntimeError("this model is already inside a kvpress-mm strategy context; contexts do not nest")
        self.backend = self.decoder.config._attn_implementation
        if self.backend not in SUPPORTED_BACKENDS:
            raise ValueError(
                f"kvpress-mm works with the language model's attention backends {SUPPORTED_BACKENDS}, "
                f"this model uses {self.backend!r}; load it with attn_implementation='sdpa'"
            )
        if self.sliding and id(self.model) not in _SLIDING_LOGGED:
            _SLIDING_LOGGED.add(id(self.model))
            logger.info(
                "%s: %d sliding-window layers are left uncompressed (%s)",
                self.adapter.family, len(self.sliding), sorted(self.sliding),
            )
        try:
            set_decoder_attention(self.model, self.decoder, _register_wrapper(self.backend))
            for idx, module in self.attention_modules.items():
                _ACTIVE[id(module)] = self
                self._handles.append(module.register_forward_hook(self._after_attention, with_kwargs=True))
            self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
            self._active = True
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._uninstall()

    def _uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self.attention_modules.values():
            if _ACTIVE.get(id(module)) is self:
                del _ACTIVE[id(module)]
        if self.backend is not None and self.decoder.config._attn_implementation != self.backend:
            set_decoder_attention(self.model, self.decoder, self.backend)
        # report, kept and slots stay readable after the block; per-step scratch goes
        self.pending.clear()
        self.decode_mask_2d = None
        self._active = False

    # ------------------------------------------------------------------ prompt bookkeeping
    def _reset_prompt(self) -> None:
        self.modality: torch.Tensor | None = None  # [B, L] prompt labels on the model's input device
        self._by_device: dict = {}
        self.states: dict[int, LayerState] = {}  # layer -> layout after its prefill
        self.kept: dict[int, torch.Tensor] = {}  # layer -> bool [B, 1|Hkv, L]: prompt positions kept at prefill
        self.compressed_any = False
        self.pending: dict[int, tuple] = {}
        self.decode_mask_2d: torch.Tensor | None = None
        self._keep: dict[int, torch.Tensor] = {}
        self._padding_masks: dict[tuple, bool] = {}  # (id, data_ptr, shape) of a prefill mask -> causal + padding?
        self._future_hidden: dict[tuple, bool] = {}  # same key -> the mask hides every later key?

    def _before_forward(self, module, args, kwargs):
        cache = _cache_from(kwargs)
        if cache is None or cache.get_seq_length() == 0:
            self._start_prompt(args, kwargs)
        else:
            mask = kwargs.get("attention_mask")
            usable = isinstance(mask, torch.Tensor) and mask.dim() == 2
            # an all-real mask (the usual case) needs no per-layer tail: checked once per step here
            self.decode_mask_2d = mask if usable and not bool(mask.all()) else None

    def _start_prompt(self, args, kwargs) -> None:
        self._reset_prompt()
        self.report = CompressionReport()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
            attention_mask = None
        if input_ids is not None:
            self.modality = self.adapter.modality(self.model, input_ids, attention_mask, kwargs)
            return
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return
        if self.adapter.multimodal:
            logger.warning("prompt given as inputs_embeds without input_ids: every position is treated as text")
        fake_ids = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        self.modality = modality_from_ids(fake_ids, attention_mask)

    def _modality_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._by_device:
            modality = self.modality.to(device)
            valid = modality != int(Modality.PAD)
            # (modality, valid, n_valid, every position real?): once per prompt and device, one host read
            self._by_device[device] = (modality, valid, valid.sum(-1), bool(valid.all()))
        return self._by_device[device][0]

    def _valid_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(valid [B, L], n_valid [B], all real?) of the prompt, cached like the modality."""
        self._modality_on(device)
        return self._by_device[device][1:]

    def _keep_counts(self, idx: int, modality: torch.Tensor) -> torch.Tensor:
        if idx not in self._keep:
            _, n_valid, _ = self._valid_on(modality.device)
            counts = self.strategy.kept_counts(n_valid, idx, self.num_layers).to(modality.device)
            self._keep[idx] = (counts, bool((counts < n_valid).any()))
        return self._keep[idx][0]

    def _evicts(self, idx: int, modality: torch.Tensor) -> bool:
        self._keep_counts(idx, modality)
        return self._keep[idx][1]

    def _is_prefill(self, query: torch.Tensor, key: torch.Tensor) -> bool:
        return (
            self.modality is not None
            and query.shape[2] > 1
            and key.shape[2] == query.shape[2] == self.modality.shape[1]
        )

    # ------------------------------------------------------------------ the attention wrapper
    def attention(self, base, module, query, key, value, attention_mask, **kwargs):
        idx = module.layer_idx
        if idx not in self.managed:
            return base(module, query, key, value, attention_mask, **kwargs)
        if self._is_prefill(query, key):
            modality = self._modality_on(query.device)
            if self.needs.any and (self.decode_every or self._evicts(idx, modality)):
                return self._prefill_with_stats(base, module, query, key, value, attention_mask, modality, kwargs)
            return base(module, query, key, value, attention_mask, **kwargs)
        state = self.states.get(idx)
        if state is not None:
            if self.compressed_any:
                attention_mask = state.decode_mask(query, key, self.decode_mask_2d, eager=self.backend == "eager")
            if state.scores is not None:
                state.add_scores(self._decode_probs(query, key, attention_mask, kwargs))
        return base(module, query, key, value, attention_mask, **kwargs)

    def _decode_probs(self, query, key, attention_mask, kwargs) -> torch.Tensor:
        """Probabilities of the decode queries over the layer's keys, [B, H, q, S] float32."""
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        allowed = allowed_from_mask(attention_mask)
        return window_attention(query, key, scale, query.shape[2], allowed)

    def _prefill_with_stats(self, base, module, query, key, value, attention_mask, modality, kwargs):
        valid, _, all_valid = self._valid_on(modality.device)
        query_valid = None if all_valid else valid
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        if self.backend == "eager":
            output, probs = base(module, query, key, value, attention_mask, **kwargs)
            self.pending[module.layer_idx] = self._stats_from_probs(probs, query_valid)
            return output, probs
        fused = None
        plain = all(k in _PLAIN_KWARGS or v is None for k, v in kwargs.items()) and not kwargs.get("dropout")
        if self.needs.accumulated and plain and kwargs.get("is_causal", True):
            if attention_mask is None and query_valid is None:
                fused = attention_with_accumulated(query, key, value, scale)
            elif query_valid is not None and query.device.type == "cpu" and self._is_padding_mask(attention_mask, valid):
                fused = attention_with_accumulated(query, key, value, scale, key_valid=valid)
        if fused is not None:
            out, accumulated = fused
            result = (out.transpose(1, 2).contiguous(), None)
        else:
            accumulated = None
            result = base(module, query, key, value, attention_mask, **kwargs)
        allowed = allowed_from_mask(attention_mask)
        window = None
        if self.needs.window:
            window = window_attention(query, key, scale, self.needs.window, allowed, query_valid)
        if self.needs.accumulated and accumulated is None:
            within_causal = allowed is not None and self._hides_future(attention_mask, allowed)
            accumulated = accumulated_attention(query, key, scale, allowed, query_valid, within_causal)
        self.pending[module.layer_idx] = (window, accumulated)
        return result

    def _is_padding_mask(self, attention_mask, valid: torch.Tensor) -> bool:
        """Whether the layer's mask is plain causal + key padding (checked once per mask per prompt: the
        layers of one forward share their mask tensor)."""
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
            return False
        key = (id(attention_mask), attention_mask.data_ptr(), tuple(attention_mask.shape))
        if key not in self._padding_masks:
            self._padding_masks[key] = causal_with_key_padding(allowed_from_mask(attention_mask), valid)
        return self._padding_masks[key]

    def _hides_future(self, attention_mask, allowed: torch.Tensor) -> bool:
        """Whether the layer's mask is causal (padding or a window aside), once per mask per prompt: the
        statistics may then skip the key blocks after each query block."""
        key = (id(attention_mask), attention_mask.data_ptr(), tuple(attention_mask.shape))
        if key not in self._future_hidden:
            self._future_hidden[key] = hides_future(allowed)
        return self._future_hidden[key]

    def _stats_from_probs(self, probs: torch.Tensor, query_valid):
        probs = probs.float()
        if query_valid is not None:
            probs = probs * query_valid[:, None, :, None]
        window = probs[:, :, -self.needs.window :] if self.needs.window else None
        accumulated = probs.sum(2) if self.needs.accumulated else None
        return window, accumulated

    # ------------------------------------------------------------------ compression
    def _after_attention(self, module, args, kwargs, output):
        idx = module.layer_idx
        stats = self.pending.pop(idx, (None, None))
        cache = _cache_from(kwargs)
        if cache is None or self.modality is None:
            return
        layer = cache.layers[idx]
        keys = getattr(layer, "keys", None)
        if keys is None or keys.dim() != 4:
            return
        if idx not in self.managed:
            # sliding-window layers stay as they are; the report still counts their bytes
            if idx not in self.report.layers:
                size, nbytes = keys.shape[2], layer_bytes(keys, layer.values)
                self.report.layers[idx] = LayerReport(size, size, nbytes, nbytes, None)
            return
        if idx not in self.states:
            if keys.shape[2] == self.modality.shape[1]:
                self._check_layer(idx, layer)
                self._compress_prefill(idx, layer, *stats)
        elif self.decode_every:
            self._compress_decode(idx, layer)

    def _check_layer(self, idx: int, layer) -> None:
        if not isinstance(layer, DynamicLayer) or layer.is_sliding:
            raise ValueError(
                f"kvpress-mm compresses DynamicCache full-attention layers; layer {idx} is {type(layer).__name__}"
            )

    def _view(self, idx, layer, modality, keep_count, window=None, accumulated=None) -> LayerKV:
        return LayerKV(
            layer_idx=idx,
            num_layers=self.num_layers,
            keys=layer.keys,
            values=layer.values,
            modality=modality,
            keep_count=keep_count,
            num_query_heads=self.attention_modules[idx].config.num_attention_heads,
            window_attention=window,
            accumulated_attention=accumulated,
        )

    def _compress_prefill(self, idx: int, layer, window, accumulated) -> None:
        keys, values = layer.keys, layer.values
        modality = self._modality_on(keys.device)
        valid, n_valid, all_valid = self._valid_on(keys.device)
        before = layer_bytes(keys, values)
        keep_count = self._keep_counts(idx, modality)
        track = accumulated if (self.decode_every and self.needs.accumulated) else None
        length = keys.shape[2]
        positions = torch.arange(length, device=keys.device).expand(keys.shape[0], 1, length)
        slots = None if all_valid else valid[:, None, :]
        state = LayerState(length, slots, modality, keep_count, positions, length, track)
        self.states[idx] = state
        self.kept[idx] = valid[:, None, :]
        if not (self.strategy.compress_prefill() and self._evicts(idx, modality)):
            self.report.layers[idx] = LayerReport(keys.shape[2], keys.shape[2], before, before, 1.0)
            return
        view = self._view(idx, layer, modality, keep_count, window, accumulated)
        plan = self.strategy.plan(view)
        kept_share = (plan.keep & valid[:, None, :]).sum(-1).float() / n_valid[:, None].clamp(min=1)
        kept_share = self._check_plan(plan, view, kept_share.mean())
        self.kept[idx] = plan.keep
        self.states[idx], index = compacted_state(plan.keep, modality, keep_count, positions, length, track)
        apply_index(layer, index, plan.keys, plan.values)
        self.compressed_any = True
        self.report.layers[idx] = LayerReport(
            keys.shape[2], layer.keys.shape[2], before, layer_bytes(layer.keys, layer.values), kept_share
        )

    def _compress_decode(self, idx: int, layer) -> None:
        """Every `decode_every` tokens over the cap, evict back to the cap (decode-phase strategies)."""
        state = self.states[idx]
        length = layer.keys.shape[2]
        modality = state.current_modality(length, self.decode_mask_2d, layer.keys.device)
        if state.slots is not None and state.slots.shape[1] > 1:
            raise ValueError("decode-phase compression needs the same real slots in every kv head")
        real = modality != int(Modality.PAD)
        if state.slots is not None:
            real[:, : state.base_len] &= state.slots[:, 0]
            modality = modality.masked_fill(~real, int(Modality.PAD))
        over = real.sum(-1) - state.cap
        if int(over.max()) < self.decode_every:
            return
        view = self._view(idx, layer, modality, torch.minimum(state.cap, real.sum(-1)), accumulated=state.scores)
        plan = self.strategy.plan(view)
        self._check_plan(plan, view)
        total = state.total + length - state.base_len
        self.states[idx], index = compacted_state(
            plan.keep, modality, state.cap, state.current_positions(length), total, state.scores
        )
        apply_index(layer, index, plan.keys, plan.values)
        self.compressed_any = True

    def _check_plan(self, plan: Plan, view: LayerKV, extra: torch.Tensor | None = None) -> float | None:
        """Raise on a malformed plan; returns `extra` (a 0-d tensor) as a float, read in the same host sync
        as the checks (on a GPU each read waits for the queued kernels)."""
        name = type(self.strategy).__name__
        keep = plan.keep
        good_shape = keep.dim() == 3 and keep.shape in ((view.batch, 1, view.length), view.keys.shape[:3])
        if keep.dtype != torch.bool or not good_shape:
            raise ValueError(
                f"{name}.plan returned keep of shape {tuple(keep.shape)} / {keep.dtype}; "
                f"expected bool [{view.batch}, 1 or {view.kv_heads}, {view.length}]"
            )
        checks = [(keep & ~view.valid[:, None, :]).any(), ((keep.sum(-1) == 0) & (view.n_valid[:, None] > 0)).any()]
        if extra is not None:
            checks.append(extra)
        values = torch.stack([c.float() for c in checks]).tolist()
        if values[0]:
            raise ValueError(f"{name}.plan kept padding positions; keep only real tokens (layer.valid)")
        if values[1]:
            raise ValueError(f"{name}.plan kept no token for some (row, head) of layer {view.layer_idx}")
        return values[2] if extra is not None else None
        for what, states in (("keys", plan.keys), ("values", plan.values)):
            if states is not None and states.shape != view.keys.shape:
                raise ValueError(f"{name}.plan returned {what} of shape {tuple(states.shape)}, expected {tuple(view.keys.shape)}")
