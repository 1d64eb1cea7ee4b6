"""A compressed KV cache that knows how many tokens it stands for, so later calls continue it correctly.

A compacted layer holds fewer physical slots than the tokens it stands for. transformers asks the cache
two things before a forward: how many tokens it has seen (`get_seq_length`: `generate` then feeds only
the new ids, and position ids continue from the full attention mask) and which window of that logical
sequence its slots cover (`get_mask_sizes` -> (kv_length, kv_offset), as sliding-window layers do). A
`CompressedLayer` answers with its logical length and the offset of its physical slots, and carries its
layout (`LayerState`: the original position of every slot, which slots are real) for the per-layer
decode masks that a strategy context builds.

    keys / values: [batch, kv_heads, physical slots, head_dim] = [compacted prompt | tokens appended since]
    logical length = state.total + (physical slots - state.base_len)

Outside a strategy context plain attention reads the cache with the model's own mask. That is exact when
every slot of every compressed layer is real and the layers have one physical length (batch 1 with
per-layer-uniform budgets: streaming_llm, snapkv, h2o, look_m, ...). Other layouts (padded batches,
head-wise or per-layer budgets) need the per-layer masks, so they are refused there with an error that
says to continue inside `with strategy(model):`.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .layer_state import LayerState, resolve_pending

SUPPORTED_CACHES = "DynamicCache (the default cache of generate), with DynamicLayer / sliding-window layers"


class CompressedLayer(DynamicLayer):
    """A DynamicLayer whose first `state.base_len` slots hold a compacted prompt (see the module doc).

    pending: a layer_state.PendingLayout while the forward that compacted the layer runs (its plan's checks
    and the end of its layout wait for `CompressedCache.refresh_layout`), else None."""

    pending = None

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, state: LayerState):
        super().__init__()
        self.device, self.dtype = keys.device, keys.dtype
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.state = state

    @classmethod
    def from_layer(cls, layer: DynamicLayer, state: LayerState) -> CompressedLayer:
        return cls(layer.keys, layer.values, state)

    @property
    def physical_length(self) -> int:
        return self.keys.shape[-2]

    def get_seq_length(self) -> int:
        """Tokens this layer stands for (the uncompressed sequence length), not its physical slots."""
        return self.state.total + self.physical_length - self.state.base_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): the physical slots are read as the last ones of the logical sequence."""
        physical = self.physical_length
        return physical + query_length, self.get_seq_length() - physical

    def crop(self, tokens_to_remove: int) -> None:
        """Remove appended tokens from the end (assisted decoding); compacted prompt slots cannot be cropped."""
        if tokens_to_remove > 0:  # transformers' legacy form: the final logical length
            tokens_to_remove = tokens_to_remove - self.get_seq_length()
        if tokens_to_remove == 0:
            return
        appended = self.physical_length - self.state.base_len
        if -tokens_to_remove > appended:
            raise ValueError(
                f"cannot crop {-tokens_to_remove} tokens from a compressed layer holding {appended} appended "
                "tokens: the compacted prompt's slots are not a prefix of the sequence"
            )
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.state = self.state.map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.state = self.state.map_rows(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.state = self.state.map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def kept_positions(self) -> torch.Tensor:
        """bool [batch, 1|kv_heads, logical length]: the original positions whose (possibly merged) state
        the layer still holds; the masked-reference view of this layer."""
        state, physical = self.state, self.physical_length
        positions = state.current_positions(physical)
        real = state.allowed(physical, None, positions.device)
        b, heads = positions.shape[:2]
        hits = torch.zeros((b, heads, self.get_seq_length()), dtype=torch.long, device=positions.device)
        if real is None:
            real = torch.ones_like(positions, dtype=torch.bool)
        real = real.expand(b, heads, physical)
        # padding slots point at position 0 too; adding (not assigning) keeps a real position 0 kept
        hits.scatter_add_(2, positions.masked_fill(~real, 0), real.long())
        return hits > 0


class CompressedCache(DynamicCache):
    """The DynamicCache a strategy compressed (generate's own cache object, turned into this class in place).

    `copy.deepcopy(cache)` or `cache.fork()` gives an independent copy: ask several questions about one
    compressed context, each on its own copy. `rope_deltas` [B, 1] keeps Qwen-VL's M-RoPE offset of the
    prompt: inside a strategy context a call continuing the cache reads it instead of the model's (hooks.py,
    RopeOffset); it follows the cache's rows (repeat, select, reorder).
    """

    attended = False  # True while a strategy context is reading this cache (it builds per-layer masks)
    compacted = False  # some layer holds fewer slots than tokens
    plain = True  # every compacted slot is real and the managed layers share one physical length
    rope_deltas: torch.Tensor | None = None

    def fork(self) -> CompressedCache:
        """An independent copy (tensors copied), e.g. one per question about a shared context."""
        return copy.deepcopy(self)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_offset(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_offset(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_offset(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def _map_offset(self, fn) -> None:
        """Apply a row operation to rope_deltas when it has one row per cache row (one row: shared by all)."""
        deltas = self.rope_deltas
        if isinstance(deltas, torch.Tensor) and deltas.shape[0] > 1:
            self.rope_deltas = fn(deltas)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if self.compacted and not self.attended and not self.plain:
            raise ValueError(
                "this compressed cache has per-row, per-head or per-layer layouts (a padded batch, head-wise or "
                "per-layer budgets) that the model's own attention mask cannot express; continue it inside "
                "`with strategy(model):` (the same strategy: later prompts are not compressed again unless "
                "compress='every_prompt')"
            )
        return super().get_mask_sizes(query_length, layer_idx)

    def refresh_layout(self, managed: frozenset[int]) -> None:
        """Recompute `compacted` / `plain` after a layer changed its layout; first finish the layouts laid out
        without a host read in this forward (their plans' checks: one read for all of them)."""
        layers = [self.layers[i] for i in managed if i < len(self.layers)]
        pending = []
        for layer in layers:
            if isinstance(layer, CompressedLayer) and layer.pending is not None:
                pending.append(layer.pending)
                layer.pending = None
        if pending:
            resolve_pending(pending)
        states = [layer.state for layer in layers if isinstance(layer, CompressedLayer)]
        self.compacted = any(s.compacted for s in states)
        lengths = {layer.physical_length for layer in layers}
        self.plain = all(s.slots is None for s in states) and len(lengths) <= 1

    def kept_positions(self) -> dict[int, torch.Tensor]:
        """layer -> bool [batch, 1|kv_heads, logical length] of the positions each compressed layer holds."""
        return {i: layer.kept_positions() for i, layer in enumerate(self.layers) if isinstance(layer, CompressedLayer)}


def check_cache(cache) -> None:
    """Refuse, with one clear error, a cache kvpress-mm cannot compress (never a silent no-op)."""
    name = type(cache).__name__
    if not isinstance(cache, DynamicCache) or (type(cache) not in (DynamicCache, CompressedCache)):
        raise ValueError(
            f"kvpress-mm compresses {SUPPORTED_CACHES}; got a {name}. Call generate without "
            "cache_implementation (or pass a DynamicCache) inside the strategy context"
        )
    if getattr(cache, "offloading", False):
        raise ValueError(f"kvpress-mm cannot compress an offloaded {name}; supported: {SUPPORTED_CACHES}")
    for idx, layer in enumerate(cache.layers):
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer, CompressedLayer):
            raise ValueError(
                f"kvpress-mm compresses {SUPPORTED_CACHES}; layer {idx} of this {name} is a {type(layer).__name__}"
            )


def as_compressed(cache: DynamicCache) -> CompressedCache:
    """Turn generate's DynamicCache into a CompressedCache in place (it adds methods, no required state)."""
    if type(cache) is DynamicCache:
        cache.__class__ = CompressedCache
    return cache


def fork(cache: DynamicCache) -> DynamicCache:
    """An independent copy of a (compressed) cache."""
    return copy.deepcopy(cache)
