"""What the framework remembers about one compacted cache layer between forward passes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .cache_ops import gather_positions, index_from_order, kept_order
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
    if heads_agree:
        labels = torch.gather(modality, 1, index[:, 0])
    else:
        # heads keep different positions: a slot's modality is not one label; keep only real vs padding
        labels = torch.full(index[:, 0].shape, int(Modality.TEXT), dtype=modality.dtype, device=modality.device)
    labels = labels.masked_fill(~slot_valid[:, 0], int(Modality.PAD))
    heads_out = max(heads, positions.shape[1])
    new_positions = torch.gather(positions.expand(-1, heads_out, -1), 2, index.expand(-1, heads_out, -1))
    if scores is not None:
        groups = scores.shape[1] // heads
        per_query_head = index.repeat_interleave(groups, dim=1) if heads > 1 else index.expand(-1, scores.shape[1], -1)
        scores = torch.gather(scores, 2, per_query_head)
    state = LayerState(index.shape[-1], slots, labels, cap, new_positions, total, scores, compacted=True)
    return state, index


def apply_index(layer, index: torch.Tensor, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
    """Write the gathered positions into a DynamicLayer (optionally from merged replacements)."""
    layer.keys = gather_positions(layer.keys if keys is None else keys, index)
    layer.values = gather_positions(layer.values if values is None else values, index)
