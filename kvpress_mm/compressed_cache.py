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

Head-wise budgets (and the rows of a padded batch) keep different counts per (row, kv head): the padded layout
above pads every head to the widest one and masks the spare slots. A `FlatLayer` (layout="flat") stores only what
each head keeps instead: the compacted prompt as flat keys / values [N, head_dim] (N = the sum of the kept counts,
segments per (row, kv head) back to back) and the tokens appended since as the ordinary [B, kv_heads, T, head_dim]
tail (`keys` / `values`, what update() appends to and returns). Its `state` still describes the padded layout it
stands for (slots, positions, labels), so lengths, mask sizes and kept positions are the padded layer's; the
strategy context computes its attention itself (flat_attention.py).

    FlatLayer bytes = the kept tokens' keys and values + the tail's, exactly

Outside a strategy context plain attention reads the cache with the model's own mask. That is exact when
every slot of every compressed layer is real and the layers have one physical length (batch 1 with
per-layer-uniform budgets: streaming_llm, snapkv, h2o, look_m, ...). Other layouts (padded batches,
head-wise or per-layer budgets, flat layers) need the per-layer masks or attention, so they are refused there
with an error that says to continue inside `with strategy(model):`.
"""

from __future__ import annotations

import copy
import os

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .layer_state import LayerState, resolve_pending

SUPPORTED_CACHES = "DynamicCache (the default cache of generate), with DynamicLayer / sliding-window layers"

# how a compacted layer with padding slots is stored: padded to its widest (row, kv head), or flat (FlatLayer);
# "auto": flat for head-wise budgets (where the padding costs 24-41% on mini_llava) unless the strategy also
# compresses while decoding, padded otherwise (measured: docs/strategies-heads.md, "Head-wise budgets and memory")
LAYOUTS = ("auto", "padded", "flat")
DEFAULT_LAYOUT = "auto"
LAYOUT_ENV = "KVPRESS_MM_LAYOUT"


def resolve_layout(layout: str | None, strategy) -> str:
    """The layout `strategy` uses, padded or flat: `layout`, or when None the environment's KVPRESS_MM_LAYOUT,
    or DEFAULT_LAYOUT (checked; "auto" decided as above)."""
    from .validate import check_choice

    if layout is None:
        layout = os.environ.get(LAYOUT_ENV) or DEFAULT_LAYOUT
    check_choice(type(strategy).__name__, "layout", layout, LAYOUTS)
    if layout == "auto":
        headwise = bool(getattr(strategy, "headwise_budgets", False))
        return "flat" if headwise and not strategy.decode_interval() else "padded"
    return layout


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


class FlatLayer(CompressedLayer):
    """A compacted layer stored without padding (see the module doc): flat_keys / flat_values [N, D] hold the
    compacted prompt's real slots, (row, kv head) segments in row-major order, each segment's slots in the order
    of the padded layout (`state.slots`' True entries); keys / values are the tail appended since.

    slot_heads: int16 [N], the kv head of each flat slot; counts: the host's [B][kv_heads] kept counts;
    row_offsets: [B + 1] where each row's slots start in the flat tensors."""

    def __init__(self, tail_keys, tail_values, state: LayerState, flat_keys, flat_values, slot_heads, counts):
        super().__init__(tail_keys, tail_values, state)
        self.flat_keys, self.flat_values = flat_keys, flat_values
        self.slot_heads = slot_heads
        self._set_counts(counts)

    def _set_counts(self, counts: list[list[int]]) -> None:
        self.counts = counts
        offsets = [0]
        for row in counts:
            offsets.append(offsets[-1] + sum(row))
        self.row_offsets = offsets
        self.empty_rows = [min(row, default=0) == 0 for row in counts]

    @classmethod
    def from_padded(cls, layer: CompressedLayer) -> FlatLayer:
        """The flat form of a padded compacted layer (one host read: its kept counts)."""
        state, keys, values = layer.state, layer.keys, layer.values
        b, heads, _, _ = keys.shape
        base = state.base_len
        slots = state.slots
        if slots is None:
            slots = torch.ones((b, 1, base), dtype=torch.bool, device=keys.device)
        slots = slots.to(keys.device).expand(b, heads, base)
        head_ids = torch.arange(heads, device=keys.device, dtype=torch.int16)[None, :, None].expand(b, heads, base)
        counts = slots.sum(-1).tolist()
        # the tail is copied: a view would keep the whole padded tensor alive
        return cls(
            keys[:, :, base:].clone(),
            values[:, :, base:].clone(),
            state,
            keys[:, :, :base][slots],
            values[:, :, :base][slots],
            head_ids[slots],
            counts,
        )

    def padded(self) -> CompressedLayer:
        """The padded layer this one stands for (spare slots zero, masked by `state.slots`)."""
        b, heads, _, dim = self.keys.shape
        base = self.state.base_len
        slots = self.state.slots
        if slots is None:
            slots = torch.ones((b, 1, base), dtype=torch.bool, device=self.keys.device)
        rows = slots.to(self.keys.device).expand(b, heads, base).reshape(-1).nonzero().squeeze(1)
        parts = []
        for flat, tail in ((self.flat_keys, self.keys), (self.flat_values, self.values)):
            prefix = flat.new_zeros((b * heads * base, dim)).index_copy_(0, rows, flat).view(b, heads, base, dim)
            parts.append(torch.cat([prefix, tail], dim=2))
        return CompressedLayer(parts[0], parts[1], self.state)

    @property
    def physical_length(self) -> int:
        """The padded layer's physical length (compacted prompt slots + tail): lengths and masks are its."""
        return self.state.base_len + self.keys.shape[-2]

    def kv_bytes(self) -> int:
        """Bytes of keys and values actually stored: the kept tokens' and the tail's."""
        return sum(t.numel() * t.element_size() for t in (self.flat_keys, self.flat_values, self.keys, self.values))

    def stored_length(self) -> int:
        """Slots stored per (row, kv head), on average rounded up: the kept tokens' and the tail's."""
        b, heads = self.keys.shape[:2]
        return -(-self.flat_keys.shape[0] // max(1, b * heads)) + self.keys.shape[-2]

    def _take_rows(self, rows: list[int]) -> None:
        """The flat part of rows `rows` (the cache's new row order, repeats allowed)."""
        offsets, device = self.row_offsets, self.flat_keys.device
        parts = [torch.arange(offsets[r], offsets[r + 1], device=device) for r in rows]
        index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
        self.flat_keys = self.flat_keys.index_select(0, index)
        self.flat_values = self.flat_values.index_select(0, index)
        self.slot_heads = self.slot_heads.index_select(0, index)
        self._set_counts([list(self.counts[r]) for r in rows])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._take_rows([r for r in range(len(self.counts)) for _ in range(repeats)])
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._take_rows(_row_list(indices, len(self.counts)))
        super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._take_rows(_row_list(beam_idx, len(self.counts)))
        super().reorder_cache(beam_idx)


def _row_list(indices, batch: int) -> list[int]:
    """Row indices (a tensor of indices or a bool mask, or a list) as a host list."""
    if isinstance(indices, torch.Tensor):
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(1)
        indices = indices.tolist()
    return [int(i) % batch for i in indices]


_OUTSIDE = (
    "this compressed cache has per-row, per-head or per-layer layouts (a padded batch, head-wise or per-layer "
    "budgets, flat layers) that the model's own attention cannot read; continue it inside `with strategy(model):` "
    "(the same strategy: later prompts are not compressed again unless compress='every_prompt')"
)


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
            raise ValueError(_OUTSIDE)
        return super().get_mask_sizes(query_length, layer_idx)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # a flat layer's update returns only its tail: the model's own attention would read that alone (e.g. with
        # a custom 4-D mask, which skips get_mask_sizes)
        if not self.attended and layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], FlatLayer):
            raise ValueError(_OUTSIDE)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

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
        flat = any(isinstance(layer, FlatLayer) for layer in layers)
        self.plain = all(s.slots is None for s in states) and len(lengths) <= 1 and not flat

    def flatten(self, managed: frozenset[int]) -> list[int]:
        """Store each compacted layer of `managed` that has padding slots as a FlatLayer (after refresh_layout);
        returns their indices. A layer tracking decode-phase scores stays padded."""
        done = []
        for i in sorted(managed):
            layer = self.layers[i] if i < len(self.layers) else None
            if type(layer) is not CompressedLayer or layer.pending is not None:
                continue
            state = layer.state
            if state.compacted and state.slots is not None and state.scores is None:
                self.layers[i] = FlatLayer.from_padded(layer)
                done.append(i)
        if done:
            self.plain = False
        return done

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
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer, CompressedLayer, FlatLayer):
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
