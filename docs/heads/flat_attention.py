"""Prototype: decode attention over a flattened per-head KV layout (no padding), checked against the padded one.

    python docs/heads/flat_attention.py        # a few seconds

A head-wise compacted layer today is [batch, kv_heads, max_h(count_h), head_dim], the spare slots masked. The
flattened layout stores only what each (row, kv head) keeps, back to back:

    keys, values: [N, head_dim], N = sum over (row, kv head) of count   (the prompt part, fixed after compression)
    owner:        long [N], the (row * kv_heads + kv head) each slot belongs to
    tail keys / values: [batch, kv_heads, T, head_dim]   tokens appended while decoding (every head gets each one,
                                                         so the tail needs no padding)

One decode query per query head attends to its kv head's segment and to the tail: scores of the segment by a
gather of the query per slot, a segment softmax (scatter amax / sum), and the weighted values summed back per
segment, merged with the tail's part through the shared maximum. Exact (to float rounding); memory: the kept
tokens only; time: proportional to N instead of kv_heads * max count. This is the math an attention function
registered for compacted layers would run (docs/strategies-heads.md, "Head-wise budgets and memory").
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def flatten(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor):
    """Padded [B, Hkv, S, D] + keep bool [B, Hkv, S] -> (flat keys [N, D], flat values [N, D], owner long [N])."""
    b, h, s, d = keys.shape
    rows = torch.arange(b * h).repeat_interleave(s).view(b, h, s)
    return keys[keep], values[keep], rows[keep]


def flat_decode_attention(q, flat_k, flat_v, owner, tail_k, tail_v, scale):
    """q [B, H, 1, D]; flat_k / flat_v [N, D], owner [N]; tail_k / tail_v [B, Hkv, T, D] -> out [B, H, 1, D]."""
    b, heads, _, d = q.shape
    kv_heads = tail_k.shape[1]
    groups = heads // kv_heads
    segments = b * kv_heads
    qg = q.view(segments, groups, d).float()
    # the prompt part: one score per (slot, query head of its group)
    scores = torch.einsum("ngd,nd->ng", qg[owner], flat_k.float()) * scale  # [N, G]
    index = owner[:, None].expand(-1, groups)
    top = torch.full((segments, groups), float("-inf")).scatter_reduce(0, index, scores, "amax")
    # the tail: every (row, kv head) sees the same T appended tokens
    tail = torch.einsum("sgd,std->sgt", qg, tail_k.reshape(segments, -1, d).float()) * scale  # [S, G, T]
    top = torch.maximum(top, tail.amax(-1)) if tail.shape[-1] else top
    p = (scores - top[owner]).exp()
    p_tail = (tail - top[..., None]).exp()
    total = torch.zeros(segments, groups).index_add_(0, owner, p) + p_tail.sum(-1)
    out = torch.zeros(segments, groups, d).index_add_(0, owner, p[..., None] * flat_v.float()[:, None, :])
    out = out + torch.einsum("sgt,std->sgd", p_tail, tail_v.reshape(segments, -1, d).float())
    return (out / total[..., None]).view(b, heads, 1, d).to(q.dtype)


def padded_layer(keys, values, keep, tail_k, tail_v, groups):
    """The layout of today: the padded prompt part + the tail (as the cache holds them), and the decode mask."""
    k = torch.cat([keys, tail_k], 2).repeat_interleave(groups, 1)
    v = torch.cat([values, tail_v], 2).repeat_interleave(groups, 1)
    allowed = torch.cat([keep, torch.ones(keep.shape[:2] + (tail_k.shape[2],), dtype=torch.bool)], -1)
    return k, v, allowed.repeat_interleave(groups, 1)[:, :, None, :]


def padded_decode_attention(q, k, v, mask, scale):
    """Decode attention over the padded layer, spare slots masked (sdpa)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def repadded_decode_attention(q, flat_k, flat_v, slot, width, tail_k, tail_v, mask, scale):
    """The flat layout at rest, re-padded for one layer and step (a transient copy), then sdpa."""
    b, kv_heads, _, d = tail_k.shape
    groups = q.shape[1] // kv_heads
    keys = flat_k.new_zeros(b * kv_heads * width, d).index_copy_(0, slot, flat_k).view(b, kv_heads, width, d)
    values = flat_v.new_zeros(b * kv_heads * width, d).index_copy_(0, slot, flat_v).view(b, kv_heads, width, d)
    k = torch.cat([keys, tail_k], 2).repeat_interleave(groups, 1)
    v = torch.cat([values, tail_v], 2).repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def main() -> None:
    torch.manual_seed(0)
    # mini_llava's widest SparseMM layer at budget 0.1 (docs/heads/headwise_memory.py): counts 1029, 84, 1029
    batch, kv_heads, groups, d, tail_len = 1, 3, 3, 64, 16
    counts = torch.tensor([[1029, 84, 1029]])
    width = int(counts.max())
    keep = torch.arange(width)[None, None, :] >= (width - counts)[..., None]  # left-aligned padding, as compacted
    keys = torch.randn(batch, kv_heads, width, d)
    values = torch.randn(batch, kv_heads, width, d)
    tail_k, tail_v = torch.randn(batch, kv_heads, tail_len, d), torch.randn(batch, kv_heads, tail_len, d)
    q = torch.randn(batch, kv_heads * groups, 1, d)
    scale = d**-0.5
    flat_k, flat_v, owner = flatten(keys, values, keep)
    got = flat_decode_attention(q, flat_k, flat_v, owner, tail_k, tail_v, scale)
    k_all, v_all, mask = padded_layer(keys, values, keep, tail_k, tail_v, groups)
    ref = padded_decode_attention(q, k_all, v_all, mask, scale)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    slot = torch.nonzero(keep.flatten()).flatten()  # where each flat slot sits in the padded layer
    repadded = repadded_decode_attention(q, flat_k, flat_v, slot, width, tail_k, tail_v, mask, scale)
    torch.testing.assert_close(repadded, ref, atol=1e-5, rtol=1e-5)
    padded_bytes = 2 * keys.numel() * keys.element_size()
    flat_bytes = 2 * flat_k.numel() * flat_k.element_size() + owner.numel() * owner.element_size()
    print(
        f"equal to the padded layout; prompt part {padded_bytes / 2**20:.2f} MiB padded, "
        f"{flat_bytes / 2**20:.2f} MiB flat (owner index included)"
    )
    for name, fn, args in (
        ("padded sdpa", padded_decode_attention, (q, k_all, v_all, mask, scale)),
        ("flat, segment softmax", flat_decode_attention, (q, flat_k, flat_v, owner, tail_k, tail_v, scale)),
        (
            "flat, re-padded per step",
            repadded_decode_attention,
            (q, flat_k, flat_v, slot, width, tail_k, tail_v, mask, scale),
        ),
    ):
        fn(*args)
        start = time.perf_counter()
        for _ in range(200):
            fn(*args)
        print(f"{name}: {(time.perf_counter() - start) / 200 * 1e6:.0f} us per decode step and layer (CPU)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
