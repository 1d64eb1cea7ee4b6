"""Asking a strategy for its plan and compacting a cache layer to it (prompt end, decode steps).

Each function reads one layer of the cache, builds the `LayerKV` the strategy sees, checks the `Plan` it
returns and writes the compacted layer back as a `CompressedLayer`, whose `LayerState` gives the decode
masks and the original position of every slot. The only writes to the cache go through `apply_index`.
"""

from __future__ import annotations

import torch

from .cache_ops import layer_bytes
from .compressed_cache import CompressedLayer
from .layer import LayerKV, Plan
from .layer_state import LayerState, apply_index, compacted_state
from .modality import Modality
from .report import LayerReport


def layer_view(
    layer_idx, num_layers, keys, values, modality, keep_count, num_query_heads, window=None, accumulated=None, **extra
) -> LayerKV:
    """extra: further LayerKV fields (statistics.LayerStats.view_fields: window positions, sparsity, ...)."""
    return LayerKV(
        layer_idx=layer_idx,
        num_layers=num_layers,
        keys=keys,
        values=values,
        modality=modality,
        keep_count=keep_count,
        num_query_heads=num_query_heads,
        window_attention=window,
        accumulated_attention=accumulated,
        **extra,
    )


def check_plan(strategy, plan: Plan, view: LayerKV, extra: torch.Tensor | None = None) -> float | None:
    """Raise a ValueError naming the strategy on a malformed plan; returns `extra` (a 0-d tensor) as a
    float, read in the same host sync as the checks (on a GPU each read waits for the queued kernels)."""
    name = type(strategy).__name__
    keep = plan.keep
    if not isinstance(keep, torch.Tensor):
        raise ValueError(f"{name}.plan returned keep={type(keep).__name__}; expected a bool tensor")
    good_shape = keep.dim() == 3 and keep.shape in ((view.batch, 1, view.length), view.keys.shape[:3])
    if keep.dtype != torch.bool or not good_shape:
        raise ValueError(
            f"{name}.plan returned keep of shape {tuple(keep.shape)} / {keep.dtype}; "
            f"expected bool [{view.batch}, 1 or {view.kv_heads}, {view.length}]"
        )
    for what, states in (("keys", plan.keys), ("values", plan.values)):
        expected = (view.keys if what == "keys" else view.values).shape
        if states is not None and (not isinstance(states, torch.Tensor) or states.shape != expected):
            got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ValueError(
                f"{name}.plan returned {what} of shape {got} for layer {view.layer_idx}; expected {tuple(expected)} "
                "(full-length replacements: [batch, kv_heads, seq, head_dim])"
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


def compress_first_prompt(strategy, layer, idx, num_layers, num_query_heads, prompt, stats, track_scores):
    """Compact a layer holding exactly one prompt. Returns (CompressedLayer, LayerReport, keep [B, 1|H, L])."""
    window, accumulated = stats
    keys, values = layer.keys, layer.values
    modality, valid, n_valid, all_valid = prompt.on(keys.device)
    before = layer_bytes(keys, values)
    keep_count = prompt.keep_counts(idx, keys.device)
    track = accumulated if track_scores else None
    length = keys.shape[2]
    positions = torch.arange(length, device=keys.device).expand(keys.shape[0], 1, length)
    slots = None if all_valid else valid[:, None, :]
    state = LayerState(length, slots, modality, keep_count, positions, length, track)
    out = CompressedLayer.from_layer(layer, state)
    if not (strategy.compress_prefill() and prompt.evicts(idx, keys.device)):
        return out, LayerReport(length, length, before, before, 1.0), valid[:, None, :]
    more = stats.view_fields() if hasattr(stats, "view_fields") else {}
    view = layer_view(idx, num_layers, keys, values, modality, keep_count, num_query_heads, window, accumulated, **more)
    plan = strategy.plan(view)
    kept_share = (plan.keep & valid[:, None, :]).sum(-1).float() / n_valid[:, None].clamp(min=1)
    kept_share = check_plan(strategy, plan, view, kept_share.mean())
    out.state, index = compacted_state(plan.keep, modality, keep_count, positions, length, track)
    apply_index(out, index, plan.keys, plan.values)
    report = LayerReport(length, out.keys.shape[2], before, layer_bytes(out.keys, out.values), kept_share)
    return out, report, plan.keep


def past_state(layer, length: int, mask_2d: torch.Tensor | None) -> LayerState:
    """The layout of the first `length` slots of a layer a later prompt is appended to."""
    if isinstance(layer, CompressedLayer):
        return layer.state
    # a plain cache the strategy never saw (e.g. a prefix computed outside the context): nothing evicted
    b, device = layer.keys.shape[0], layer.keys.device
    real = None if mask_2d is None else mask_2d[:, :length].to(device=device, dtype=torch.bool)
    labels = torch.full((b, length), int(Modality.TEXT), dtype=torch.int8, device=device)
    if real is not None:
        labels = labels.masked_fill(~real, int(Modality.PAD))
    positions = torch.arange(length, device=device).expand(b, 1, length)
    slots = None if real is None or bool(real.all()) else real[:, None, :]
    cap = labels.ne(int(Modality.PAD)).sum(-1)
    return LayerState(length, slots, labels, cap, positions, length)


def compress_later_prompt(strategy, layer, idx, num_layers, num_query_heads, prompt, stats, mask_2d):
    """Compact the new prompt at the end of a layer, keeping its past as it is.

    The layer holds [past (start slots) | prompt (L slots)]; the strategy plans over the prompt's slots
    with statistics taken over every key. mask_2d: [B, logical past + L] of this forward, or None.
    Returns (CompressedLayer, LayerReport).
    """
    window, accumulated = stats
    keys, values = layer.keys, layer.values
    n = prompt.length
    start = keys.shape[2] - n
    device = keys.device
    past_mask = None if mask_2d is None else mask_2d[:, :-n]
    past = past_state(layer, start, past_mask)
    logical_before = past.total + start - past.base_len
    modality, valid, n_valid, all_valid = prompt.on(device)
    keep_count = prompt.keep_counts(idx, device)
    before = layer_bytes(keys, values)

    past_labels = past.current_modality(start, past_mask, device)
    past_positions = past.current_positions(start)
    past_real = past.allowed(start, past_mask, device)
    b = keys.shape[0]
    new_positions = torch.arange(logical_before, logical_before + n, device=device).expand(b, 1, n)
    scores = None
    if past.scores is not None:  # decode-phase H2O: the new queries' attention adds to what the past received
        scores = torch.nn.functional.pad(past.scores, (0, keys.shape[2] - past.scores.shape[-1]))
        if accumulated is not None:
            scores = scores + accumulated

    evicts = strategy.compress_prefill() and prompt.evicts(idx, device)
    if evicts:
        view = layer_view(
            idx,
            num_layers,
            keys[:, :, start:],
            values[:, :, start:],
            modality,
            keep_count,
            num_query_heads,
            None if window is None else window[..., start:],
            None if accumulated is None else accumulated[..., start:],
            **(stats.view_fields() if hasattr(stats, "view_fields") else {}),
        )
        plan = strategy.plan(view)
        kept_share = (plan.keep & valid[:, None, :]).sum(-1).float() / n_valid[:, None].clamp(min=1)
        kept_share = check_plan(strategy, plan, view, kept_share.mean())
        keep_new = plan.keep
    else:
        plan, kept_share = None, 1.0
        keep_new = valid[:, None, :]
    heads = max(keep_new.shape[1], 1 if past_real is None else past_real.shape[1], past_positions.shape[1])
    if past_real is None:
        past_real = torch.ones((b, 1, start), dtype=torch.bool, device=device)
    keep = torch.cat([past_real.expand(b, heads, start), keep_new.expand(b, heads, n)], dim=-1)
    full_labels = torch.cat([past_labels, modality], dim=-1)
    full_positions = torch.cat([past_positions.expand(b, heads, start), new_positions.expand(b, heads, n)], dim=-1)
    cap = past.cap.to(device) + keep_new[:, 0].sum(-1)
    state, index = compacted_state(keep, full_labels, cap, full_positions, logical_before + n, scores)
    out = CompressedLayer.from_layer(layer, state)
    new_keys = new_values = None
    if plan is not None and plan.keys is not None:
        new_keys = torch.cat([keys[:, :, :start], plan.keys.to(keys.dtype)], dim=2)
    if plan is not None and plan.values is not None:
        new_values = torch.cat([values[:, :, :start], plan.values.to(values.dtype)], dim=2)
    apply_index(out, index, new_keys, new_values)
    report = LayerReport(keys.shape[2], out.keys.shape[2], before, layer_bytes(out.keys, out.values), kept_share)
    return out, report


def compress_decode(strategy, layer: CompressedLayer, idx, num_layers, num_query_heads, mask_2d, every: int) -> bool:
    """Every `every` tokens over the cap, evict back to the cap (decode-phase strategies). True if compacted."""
    state = layer.state
    length = layer.keys.shape[2]
    modality = state.current_modality(length, mask_2d, layer.keys.device)
    if state.slots is not None and state.slots.shape[1] > 1:
        raise ValueError("decode-phase compression needs the same real slots in every kv head")
    real = modality != int(Modality.PAD)
    if state.slots is not None:
        real[:, : state.base_len] &= state.slots[:, 0]
        modality = modality.masked_fill(~real, int(Modality.PAD))
    over = real.sum(-1) - state.cap
    if int(over.max()) < every:
        return False
    view = layer_view(
        idx,
        num_layers,
        layer.keys,
        layer.values,
        modality,
        torch.minimum(state.cap, real.sum(-1)),
        num_query_heads,
        accumulated=state.scores,
    )
    plan = strategy.plan(view)
    check_plan(strategy, plan, view)
    total = state.total + length - state.base_len
    layer.state, index = compacted_state(
        plan.keep, modality, state.cap, state.current_positions(length), total, state.scores
    )
    apply_index(layer, index, plan.keys, plan.values)
    return True
