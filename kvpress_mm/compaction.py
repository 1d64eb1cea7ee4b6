"""Asking a strategy for its plan and compacting a cache layer to it (prompt end, decode steps).

Each function reads one layer of the cache, builds the `LayerKV` the strategy sees, checks the `Plan` it
returns and writes the compacted layer back as a `CompressedLayer`, whose `LayerState` gives the decode
masks and the original position of every slot. The only writes to the cache go through `apply_index`.

What depends only on the prompt is worked out once per prompt and device (`PromptLayout`): the real
positions and their ranks, every layer's kept counts (on the device and on the host, from the real lengths
known at the start) and whether each layer evicts. A first prompt's layer is then compacted without
reading anything back to the host (on a GPU each read waits for every queued kernel) when its strategy
keeps the budget rule's counts (exact_budget, no head-wise or cross-layer budgets): the layout's sizes are
the counts known on the host, and the plan's checks wait for the end of the forward, where the cache reads
them for every layer at once (`CompressedCache.refresh_layout`, `layer_state.resolve_pending`).
"""

from __future__ import annotations

import copy
import math
import weakref

import torch

from .budget import _EPS
from .cache_ops import layer_bytes
from .compressed_cache import CompressedLayer
from .layer import LayerKV, Plan
from .layer_state import LayerState, PendingLayout, apply_index, compacted_state, planned_state
from .modality import Modality
from .report import LayerReport
from .strategy import EvictionStrategy

# prompt -> {device: PromptLayout}; a prompt lives for one forward (the session makes a new one per prompt)
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _default_rule(strategy) -> bool:
    """Whether the strategy keeps the default budget rule (every layer the same counts)."""
    return getattr(type(strategy), "kept_counts", None) is EvictionStrategy.kept_counts


def host_kept_counts(lengths: list[int], budget: float, budget_tokens: int | None = None) -> list[int]:
    """budget.kept_counts on the host, from the rows' real lengths: the same float64 arithmetic, no tensor."""
    if budget_tokens is not None:
        return [min(n, int(budget_tokens)) for n in lengths]
    return [min(max(1, math.floor(n * float(budget) + _EPS)), n) for n in lengths]


class PromptLayout:
    """One prompt on one device: its real positions, ranks and slot positions, and every layer's kept counts.

    Built on the prompt's first compacted layer. Kept counts come from the strategy's budget rule, on the host
    from the real lengths (known without a read when every position is real, else one read per prompt) and on
    the device once for all layers (one tensor for a layer-independent rule); they are handed to the prompt
    (`Prompt.set_keep_counts`), so that what the session asks of it later in the forward is answered from them.
    A cross-layer allocation (budget_scope="model") is the prompt's own: its counts are asked for per layer.
    """

    def __init__(self, prompt, strategy, num_layers: int, device: torch.device):
        self._prompt = weakref.ref(prompt)  # a strong one would keep the prompt's _LAYOUTS entry alive
        self.device = device
        self.view = prompt.on(device)  # (modality, valid, n_valid, all valid?)
        modality, valid, n_valid, all_valid = self.view
        self.rank = torch.where(valid, valid.long().cumsum(-1) - 1, -1)
        b, length = modality.shape
        self.positions = torch.arange(length, device=device).expand(b, 1, length)
        self.model_scope = getattr(strategy, "budget_scope", "layer") == "model"
        # a plan keeps the rule's counts in every (row, kv head): laid out from them, checked at the forward's end
        self.trusted = bool(strategy.exact_budget) and not strategy.headwise_budgets and not self.model_scope
        self.lengths: list[int] | None = None
        self._host: dict[int, list[int]] = {}
        self._device: dict[int, torch.Tensor] = {}
        self._evicts: dict[int, bool] = {}
        self.last_layout = None  # (keep, counts, state, index, kept) of the last layer laid out by planned_state
        self.owner = type(strategy).__name__
        self.compress_prefill = strategy.compress_prefill()
        if self.model_scope:
            return
        self.lengths = [length] * b if all_valid else n_valid.tolist()  # the one read per prompt (padded rows)
        if _default_rule(strategy):
            host = host_kept_counts(self.lengths, strategy.budget, strategy.budget_tokens)
            counts = strategy.kept_counts(n_valid, 0, num_layers).to(device)
            self._host = dict.fromkeys(range(num_layers), host)
            self._device = dict.fromkeys(range(num_layers), counts)
        else:
            # the strategy's own rule, evaluated on the host's lengths (a CPU tensor: no device sync)
            lengths = torch.tensor(self.lengths, dtype=torch.long)
            table = torch.stack([strategy.kept_counts(lengths, i, num_layers).long() for i in range(num_layers)])
            self._host = dict(enumerate(table.tolist()))
            on_device = _to_device(table, device)
            self._device = {i: on_device[i] for i in range(num_layers)}
        self._evicts = {i: any(c < n for c, n in zip(host, self.lengths)) for i, host in self._host.items()}
        if strategy.needs().any:
            # the session asks the prompt whether each layer evicts before its statistics: answered from these
            prompt.set_keep_counts(self._device)

    def keep_count(self, idx: int) -> torch.Tensor:
        if idx in self._device:
            return self._device[idx]
        return self._prompt().keep_counts(idx, self.device)

    def evicts(self, idx: int) -> bool:
        if idx in self._evicts:
            return self._evicts[idx]
        return self._prompt().evicts(idx, self.device)

    def host_counts(self, idx: int) -> list[int] | None:
        """[B] the layer's kept counts on the host, None when they are not known there (model scope)."""
        return self._host.get(idx)


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table on `device` without waiting for the queued kernels (pinned, non-blocking)."""
    if device.type == "cpu":
        return table
    try:
        return table.pin_memory().to(device, non_blocking=True)
    except RuntimeError:  # no pinned memory here
        return table.to(device)


_LAST: list = [None, None, None]  # weakref to the last prompt asked for, its device, its PromptLayout


def prompt_layout(prompt, strategy, num_layers: int, device: torch.device) -> PromptLayout:
    """The PromptLayout of `prompt` on `device` (made on first use)."""
    last = _LAST
    if last[1] == device and last[0] is not None and last[0]() is prompt:
        return last[2]
    per_device = _LAYOUTS.get(prompt)
    if per_device is None:
        per_device = _LAYOUTS[prompt] = {}
    layout = per_device.get(device)
    if layout is None:
        layout = per_device[device] = PromptLayout(prompt, strategy, num_layers, device)
    _LAST[:] = [weakref.ref(prompt), device, layout]
    return layout


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
    _check_shapes(strategy, plan, view)
    keep = plan.keep
    checks = [(keep & ~view.valid[:, None, :]).any(), ((keep.sum(-1) == 0) & (view.n_valid[:, None] > 0)).any()]
    if extra is not None:
        checks.append(extra)
    values = torch.stack([c.float() for c in checks]).tolist()
    if values[0]:
        raise ValueError(f"{name}.plan kept padding positions; keep only real tokens (layer.valid)")
    if values[1]:
        raise ValueError(f"{name}.plan kept no token for some (row, head) of layer {view.layer_idx}")
    return values[2] if extra is not None else None


def _seed_view(view: LayerKV, layout: PromptLayout) -> LayerKV:
    """The prompt's real positions, counts and ranks as the view's (cached) properties: computed once per
    prompt, not once per layer. Only for a view of the prompt's own labels."""
    _, valid, n_valid, _ = layout.view
    view.__dict__.update(valid=valid, n_valid=n_valid, rank=layout.rank)
    return view


def _check_shapes(strategy, plan: Plan, view: LayerKV) -> None:
    """The checks of `check_plan` that need no tensor values."""
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


def compress_first_prompt(strategy, layer, idx, num_layers, num_query_heads, prompt, stats, track_scores):
    """Compact a layer holding exactly one prompt. Returns (CompressedLayer, LayerReport, keep [B, 1|H, L]).

    A strategy keeping the budget rule's counts is laid out without a host read (see the module docstring):
    the layer then carries a PendingLayout until the forward ends, and its report's kept_fraction is filled in
    there."""
    window, accumulated = stats
    keys, values = layer.keys, layer.values
    layout = prompt_layout(prompt, strategy, num_layers, keys.device)
    modality, valid, n_valid, all_valid = layout.view
    before = layer_bytes(keys, values)
    keep_count = layout.keep_count(idx)
    track = accumulated if track_scores else None
    length = keys.shape[2]
    if not (layout.compress_prefill and layout.evicts(idx)):
        slots = None if all_valid else valid[:, None, :]
        state = LayerState(length, slots, modality, keep_count, layout.positions, length, track)
        return CompressedLayer(keys, values, state), LayerReport(length, length, before, before, 1.0), valid[:, None, :]
    more = stats.view_fields() if hasattr(stats, "view_fields") else {}
    view = layer_view(idx, num_layers, keys, values, modality, keep_count, num_query_heads, window, accumulated, **more)
    plan = strategy.plan(_seed_view(view, layout))
    keep = plan.keep
    host = layout.host_counts(idx) if layout.trusted else None
    if host is None:
        kept_share = (keep & valid[:, None, :]).sum(-1).float() / n_valid[:, None].clamp(min=1)
        kept_share = check_plan(strategy, plan, view, kept_share.mean())
        state, index = compacted_state(keep, modality, keep_count, layout.positions, length, track)
        out = CompressedLayer(keys, values, state)
        apply_index(out, index, plan.keys, plan.values)
        report = LayerReport(length, out.keys.shape[2], before, layer_bytes(out.keys, out.values), kept_share)
        return out, report, keep
    _check_shapes(strategy, plan, view)
    last = layout.last_layout
    if last is not None and last[0] is keep and last[1] is keep_count and track is None:
        # the same mask as the previous layer's (a plan that depends on the prompt only): the same layout
        state, index, counts = copy.copy(last[2]), last[3], last[4]
    else:
        state, index, counts = planned_state(keep, modality, keep_count, None, length, track, max(host), min(host))
        layout.last_layout = None if track is not None else (keep, keep_count, state, index, counts)
    out = CompressedLayer(keys, values, state)
    apply_index(out, index, plan.keys, plan.values)
    report = LayerReport(length, state.base_len, before, layer_bytes(out.keys, out.values), None)
    valid_or_none = None if all_valid else valid
    out.pending = PendingLayout(
        layout.owner, idx, state, keep, counts, index, keep_count, valid_or_none, n_valid, report
    )
    return out, report, keep


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
    layout = prompt_layout(prompt, strategy, num_layers, device)
    modality, valid, n_valid, all_valid = layout.view
    keep_count = layout.keep_count(idx)
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

    evicts = strategy.compress_prefill() and layout.evicts(idx)
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
        plan = strategy.plan(_seed_view(view, layout))
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
