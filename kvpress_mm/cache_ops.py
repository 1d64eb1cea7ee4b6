"""Applying a Plan to a cache layer: the only code that writes the KV cache."""

from __future__ import annotations

import torch


def compact_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions as gather indices, left-padded to the largest count.

    keep: bool [B, h, L]. Returns index [B, h, K] (kept positions ascending, preceded by distinct
    unkept filler positions where a (row, head) keeps fewer than K) and slot_valid [B, h, K].
    """
    length = keep.shape[-1]
    counts = keep.sum(-1)
    k_max = int(counts.max()) if counts.numel() else 0
    # kept positions sort after unkept ones, each group in original order
    order_key = keep.long() * length + torch.arange(length, device=keep.device)
    index = order_key.argsort(dim=-1)[..., length - k_max :]
    slot_valid = torch.arange(k_max, device=keep.device) >= (k_max - counts)[..., None]
    return index, slot_valid


def gather_positions(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """states [B, Hkv, L, D], index [B, 1|Hkv, K] -> [B, Hkv, K, D]."""
    b, kv_heads, _, d = states.shape
    index = index.expand(b, kv_heads, index.shape[-1])
    return torch.gather(states, 2, index[..., None].expand(-1, -1, -1, d))


def layer_bytes(keys: torch.Tensor, values: torch.Tensor) -> int:
    return keys.numel() * keys.element_size() + values.numel() * values.element_size()
