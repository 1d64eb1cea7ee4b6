"""What the framework remembers about one compacted cache layer between forward passes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .cache_ops import gather_layer, index_from_order, kept_order
from .modality import Modality


@dataclass
class LayerState:
    """The layout of a compacted layer.

    The physical cache is [base slots | tokens appended since]. `slots` tells which base slots hold a
    real token (left-padded rows, head-wise budgets); the appended tokens' validity is the tail of the
    2-D attention mask that generate() keeps extending.
    """

    base_len: int
    slots: torch.Tensor | None  # bool [B, 1|Hkv, base_len]; None = all real
    modality: torch.Tensor  # [B, base_len] labels of the base slots (PAD where not real)
    cap: torch.Tensor  # [B] real tokens per row that decode-phase compression returns to
    positions: torch.Tensor  # [B, 1|Hkv, base_len] index of each base slot in the uncompressed sequence
    total: int  # uncompressed sequence length when the base was laid out
    scores: torch.Tensor | None = None  # [B, H, S] attention each slot received (decode-phase H2O)
    compacted: bool = False  # False: the layer still has its prefill layout

    def tail(self, length: int, mask_2d: torch.Tensor | None, device) -> torch.Tensor | None:
        """bool [B, length - base_len] validity of the appended tokens, None when all are real."""
        n_new = length - self.base_len
        if mask_2d is None or n_new <= 0:
            return None
        tail = mask_2d[:, -n_new:].to(device=device, dtype=torch.bool)
        return None if bool(tail.all()) else tail

    def allowed(self, length: int, mask_2d, device) -> torch.Tensor | None:
        """bool [B, 1|Hkv, length] real slots of the whole physical layer, None when all are real."""
        tail = self.tail(length, mask_2d, device)
        if self.slots is None and tail is None:
            return None
        b, heads = self.modality.shape[0], 1 if self.slots is None else self.slots.shape[1]
        base = self.slots
        if base is None:
            base = torch.ones((b, 1, self.base_len), dtype=torch.bool, device=device)
        n_new = length - self.base_len
        if tail is None:
            tail = torch.ones((b, n_new), dtype=torch.bool, device=device)
        return torch.cat([base, tail[:, None, :].expand(b, heads, n_new)], dim=-1)

    def decode_mask(self, query: torch.Tensor, key: torch.Tensor, mask_2d, eager: bool):
        """The attention mask of a decode step over this layer's compacted cache (None if not needed)."""
        q_len, s_len = query.shape[2], key.shape[2]
        allowed = self.allowed(s_len, mask_2d, key.device)
        if allowed is None and q_len == 1:
            return None
        if allowed is None:
            allowed = torch.ones((key.shape[0], 1, s_len), dtype=torch.bool, device=key.device)
        allowed = allowed[:, :, None, :]
        if q_len > 1:  # several new tokens at once: causal among them
            q_pos = torch.arange(s_len - q_len, s_len, device=key.device)[:, None]
            allowed = allowed & (torch.arange(s_len, device=key.device)[None, :] <= q_pos)
        if allowed.shape[1] > 1:  # head-wise budgets: one mask per query head
            allowed = allowed.repeat_interleave(query.shape[1] // allowed.shape[1], dim=1)
        if eager:
            return torch.zeros(allowed.shape, dtype=query.dtype, device=key.device).masked_fill_(
                ~allowed, torch.finfo(query.dtype).min
            )
        return allowed

    def current_modality(self, length: int, mask_2d, device) -> torch.Tensor:
        """[B, length] labels of every physical slot; appended tokens are text."""
        n_new = length - self.base_len
        labels = self.modality.to(device)
        if n_new > 0:
            new = torch.full((labels.shape[0], n_new), int(Modality.TEXT), dtype=labels.dtype, device=device)
            tail = self.tail(length, mask_2d, device)
            if tail is not None:
                new[~tail] = int(Modality.PAD)
            labels = torch.cat([labels, new], dim=-1)
        return labels

    def current_positions(self, length: int) -> torch.Tensor:
        """[B, 1|Hkv, length] index of every physical slot in the uncompressed sequence."""
        n_new = length - self.base_len
        if n_new <= 0:
            return self.positions
        b, heads = self.positions.shape[:2]
        new = torch.arange(self.total, self.total + n_new, device=self.positions.device)
        return torch.cat([self.positions, new.expand(b, heads, n_new)], dim=-1)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LayerState:
        """The same layout with `fn` applied along the batch dimension (repeat, select, reorder rows)."""
        return replace(
            self,
            slots=None if self.slots is None else fn(self.slots),
            modality=fn(self.modality),
            cap=fn(self.cap),
            positions=fn(self.positions),
            scores=None if self.scores is None else fn(self.scores),
        )

    def add_scores(self, probs: torch.Tensor) -> None:
        """Accumulate [B, H, q, S] decode-query probabilities into the per-slot scores."""
        grow = probs.shape[-1] - self.scores.shape[-1]
        if grow > 0:
            self.scores = torch.nn.functional.pad(self.scores, (0, grow))
        self.scores += probs.sum(2)


def compacted_state(
    keep: torch.Tensor,
    modality: torch.Tensor,
    cap: torch.Tensor,
    positions: torch.Tensor,
    total: int,
    scores: torch.Tensor | None,
) -> tuple[LayerState, torch.Tensor]:
    """The state after compacting to `keep` (bool [B, 1|Hkv, S]), and the gather index [B, 1|Hkv, K].

    positions: [B, 1|Hkv, S] original index of the current slots; total: uncompressed length so far.
    """
    # everything the layout depends on is read from the host in one sync (on a GPU each read waits for the
    # queued kernels): the largest and smallest kept counts and, with several kv heads, whether the heads of
    # each row keep as many and the last position where the heads' orders differ
    length, heads = keep.shape[-1], keep.shape[1]
    counts = keep.sum(-1)
    order = kept_order(keep)
    sizes = [counts.max(), counts.min()]
    if heads > 1:
        differs = (order != order[:, :1]).flatten(0, 1).any(0)
        sizes += [
            (counts != counts[:, :1]).any().long(),
            torch.where(differs, torch.arange(length, device=keep.device), -1).max(),
        ]
    k_max, k_min, *per_head = torch.stack(sizes).tolist()
    index, slot_valid = index_from_order(order, counts, k_max)
    every_full = k_min == k_max
    rows_uniform = heads == 1 or not per_head[0]
    heads_agree = heads == 1 or per_head[1] < length - k_max  # the heads' gather indices are the same
    if every_full:
        slots = None
    elif rows_uniform:
        slots = slot_valid[:, :1]
    else:
        slots = slot_valid
    labels = _slot_labels(modality, index, None if every_full else slot_valid[:, 0], heads_agree)
    new_positions = _slot_positions(positions, index, heads)
    scores = _slot_scores(scores, index, heads)
    state = LayerState(index.shape[-1], slots, labels, cap, new_positions, total, scores, compacted=True)
    return state, index


def _slot_labels(modality, index, slot_valid, heads_agree: bool) -> torch.Tensor:
    """[B, K] labels of the compacted slots (PAD where slot_valid [B, K] is False)."""
    if heads_agree:
        labels = torch.gather(modality, 1, index[:, 0])
    else:
        # heads keep different positions: a slot's modality is not one label; keep only real vs padding
        labels = torch.full(index[:, 0].shape, int(Modality.TEXT), dtype=modality.dtype, device=modality.device)
    return labels if slot_valid is None else labels.masked_fill(~slot_valid, int(Modality.PAD))


def _slot_positions(positions, index, heads: int) -> torch.Tensor:
    heads_out = max(heads, positions.shape[1])
    return torch.gather(positions.expand(-1, heads_out, -1), 2, index.expand(-1, heads_out, -1))


def _slot_scores(scores, index, heads: int):
    if scores is None:
        return None
    groups = scores.shape[1] // heads
    per_query_head = index.repeat_interleave(groups, dim=1) if heads > 1 else index.expand(-1, scores.shape[1], -1)
    return torch.gather(scores, 2, per_query_head)


@dataclass
class PendingLayout:
    """A layer laid out by `planned_state`, whose plan is checked when the forward ends (`resolve_pending`).

    counts: [B, h] what the plan kept; expected: [B] the budget rule's counts; valid / n_valid: the prompt's
    real positions (valid None: every position real); report: the layer's LayerReport (kept_fraction is
    filled in); owner: the strategy's class name (for the errors).
    """

    owner: str
    layer_idx: int
    state: LayerState
    keep: torch.Tensor
    counts: torch.Tensor
    index: torch.Tensor
    expected: torch.Tensor
    valid: torch.Tensor | None
    n_valid: torch.Tensor
    report: object = None


def planned_state(
    keep: torch.Tensor,
    modality: torch.Tensor,
    cap: torch.Tensor,
    positions: torch.Tensor | None,
    total: int,
    scores: torch.Tensor | None,
    k_max: int,
    k_min: int,
) -> tuple[LayerState, torch.Tensor, torch.Tensor]:
    """`compacted_state` without a host read, for a plan that keeps the budget rule's counts: cap [B] in every
    kv head, whose largest and smallest values k_max / k_min the caller knows on the host (they follow from
    the prompt's real lengths). Returns (state, index, counts [B, h] of what the plan kept): a PendingLayout
    of them is checked once the forward ends, and a plan that kept fewer than cap is laid out again then
    (`resolve_pending`); one that kept more is an error.

    positions None: the slots are the prompt's positions 0..L-1 (a first prompt), their index is the gather
    index itself.
    """
    heads, length = keep.shape[1], keep.shape[-1]
    counts = keep.sum(-1)
    index = kept_order(keep)[..., length - k_max :]
    slots = None
    if k_min < k_max:  # rows of a padded batch keep different counts: the first slots of the shorter rows
        slots = (torch.arange(k_max, device=keep.device) >= (k_max - cap)[:, None])[:, None, :]
    labels = _slot_labels(modality, index, None if slots is None else slots[:, 0], heads_agree=True)
    new_positions = index if positions is None else _slot_positions(positions, index, heads)
    scores = _slot_scores(scores, index, heads)
    state = LayerState(k_max, slots, labels, cap, new_positions, total, scores, compacted=True)
    return state, index, counts


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, or one tensor expanded when every entry is that tensor (a prompt's counts, a shared layout)."""
    first = tensors[0]
    if all(t is first for t in tensors):
        return first[None].expand(len(tensors), *first.shape)
    return torch.stack(tensors)


def _flags(group: list[PendingLayout]) -> torch.Tensor:
    """float [6, N]: kept more than the rule, fewer, no token in a (row, head) with real tokens, padding, heads
    disagreeing on the kept positions of a slot labelled other than text, the kept share; for N layers laid out
    alike (one stack each)."""
    counts = _stacked([p.counts for p in group])  # [N, B, h]
    expected = _stacked([p.expected for p in group])[..., None]
    n_valid = _stacked([p.n_valid for p in group])[..., None]
    flags = [
        (counts > expected).flatten(1).any(1),
        (counts < expected).flatten(1).any(1),
        ((counts == 0) & (n_valid > 0)).flatten(1).any(1),
    ]
    if group[0].valid is not None:
        keeps = _stacked([p.keep for p in group])
        valid = _stacked([p.valid for p in group])
        flags.append((keeps & ~valid[:, :, None, :]).flatten(1).any(1))
    else:
        flags.append(torch.zeros_like(flags[0]))
    if counts.shape[-1] > 1:
        # heads keeping different positions, where that changes a slot's label (text-only prompts: never)
        index = _stacked([p.index for p in group])
        labels = _stacked([p.state.modality for p in group])
        labelled = ((labels != int(Modality.TEXT)) & (labels != int(Modality.PAD))).flatten(1).any(1)
        flags.append((index != index[:, :, :1]).flatten(1).any(1) & labelled)
    else:
        flags.append(torch.zeros_like(flags[0]))
    flags.append((counts.float() / n_valid.clamp(min=1)).flatten(1).mean(1))
    return torch.stack([f.float() for f in flags])


def resolve_pending(pending: list[PendingLayout]) -> None:
    """Check the plans of layers laid out by `planned_state` and finish their layouts: one host read per
    group of layers alike (on one device: one for the whole prompt). Raises the plan errors of `check_plan`
    for the lowest layer at fault; a layer whose plan kept fewer than its budget gets real-slot masks."""
    groups: dict[tuple, list[PendingLayout]] = {}
    for p in pending:
        key = (p.keep.device, tuple(p.keep.shape), tuple(p.index.shape), p.valid is None)
        groups.setdefault(key, []).append(p)
    verdicts = []
    for group in groups.values():
        more, fewer, empty, padding, differ, share = _flags(group).tolist()
        verdicts += list(zip(group, more, fewer, empty, padding, differ, share))
    verdicts.sort(key=lambda v: v[0].layer_idx)
    for p, more, _, empty, padding, _, _ in verdicts:
        if padding:
            raise ValueError(f"{p.owner}.plan kept padding positions; keep only real tokens (layer.valid)")
        if empty:
            raise ValueError(f"{p.owner}.plan kept no token for some (row, head) of layer {p.layer_idx}")
        if more:
            raise ValueError(
                f"{p.owner}.plan kept more tokens than its budget rule (kept_counts) in some (row, kv head) of "
                f"layer {p.layer_idx}; a strategy that keeps other counts must declare exact_budget = False"
            )
    for p, _, fewer, _, _, differ, share in verdicts:
        if p.report is not None:
            p.report.kept_fraction = share
        if fewer:
            _lay_out_fewer(p)
        if differ:
            state = p.state
            slot_valid = None if state.slots is None else state.slots[:, 0]
            state.modality = _slot_labels(state.modality, p.index, slot_valid, heads_agree=False)


def _lay_out_fewer(p: PendingLayout) -> None:
    """Real-slot masks of a layer whose plan kept fewer than the budget in some (row, kv head)."""
    state, counts = p.state, p.counts
    k = state.base_len
    slot_valid = torch.arange(k, device=counts.device) >= (k - counts)[..., None]  # [B, h, K]
    rows_uniform = counts.shape[1] == 1 or not bool((counts != counts[:, :1]).any())
    state.slots = slot_valid[:, :1] if rows_uniform else slot_valid
    state.modality = state.modality.masked_fill(~slot_valid[:, 0], int(Modality.PAD))


def apply_index(layer, index: torch.Tensor, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
    """Write the gathered positions into a DynamicLayer (optionally from merged replacements)."""
    layer.keys, layer.values = gather_layer(
        layer.keys if keys is None else keys, layer.values if values is None else values, index
    )
