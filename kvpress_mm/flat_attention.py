"""Exact attention over a flat compacted layer (`compressed_cache.FlatLayer`): no slot padded to the largest head.

A flat layer holds its compacted prompt as keys / values [N, head_dim]: every row's (row, kv head) segments one
after the other, each segment the slots that head kept, in order (N = the sum of the kept counts); the tokens
appended since are an ordinary tail [B, kv_heads, T, head_dim] (every head receives every new token, so the tail
needs no padding). Every slot is real, so the prompt part needs no mask: it is fully visible to every new query.

Per row of the batch, with H query heads and Q new queries:

    scores [H, Q, N_b + T] = [q @ flat_keys_b^T | q @ tail_keys^T] * scale     (query head h reads kv head h // G)
    a flat slot of another kv head than the query head's: -inf                  (so each head sees its own segment)
    tail: causal among the Q new queries, the 2-D attention mask's padding -inf (left-padded later prompts)
    out = softmax(scores) @ [flat_values_b | tail_values]

The flat part is one product for all heads of a row ([H*Q, N_b]: kv_heads times the products an exact
per-segment computation needs, but a handful of kernels per row instead of a few per segment); the softmax over
both parts is one kernel, so no log-sum-exp merge is needed. A later prompt's queries are taken QUERY_CHUNK at a
time (each piece sees the tail up to its last query), so the scores held at once stay [H, QUERY_CHUNK, N_b + T]
per row. Scores and softmax run in float32 for half-precision inputs (as sdpa and the models' eager functions
accumulate). `eager`: the probabilities are also returned, [B, H, Q, K + T] in the padded layout's coordinates
(K = the widest head's count; zeros where the padded layout has a padding slot), the shape and values the model's
eager attention returns on the padded layout.
"""

from __future__ import annotations

import torch

_REFUSED = ("s_aux", "sinks", "position_bias")
# queries per piece of a long later prompt: its scores [H, Q, N_b + T] per row are held at once
QUERY_CHUNK = 512


def flat_attention(
    module,
    query: torch.Tensor,
    layer,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    mask_2d: torch.Tensor | None,
    eager: bool,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of query [B, H, Q, D] over `layer` (a FlatLayer) whose tail, the new tokens included, is
    tail_keys / tail_values [B, Hkv, T, D] (what its update() returned). mask_2d: [B, logical length] of this
    forward (its last T columns mark the tail's padding), or None when every token is real.
    Returns (out [B, Q, H, D] in query's dtype, probabilities [B, H, Q, K + T] if eager else None)."""
    _check_call(module, dropout, kwargs)
    if query.shape[2] > QUERY_CHUNK:
        return _in_chunks(module, query, layer, tail_keys, tail_values, mask_2d, eager, scaling, softcap)
    batch, heads, q_len, dim = query.shape
    kv_heads, t_len = tail_keys.shape[1], tail_keys.shape[2]
    if heads % kv_heads:
        raise ValueError(f"flat attention: {heads} query heads are not a multiple of {kv_heads} kv heads")
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    compute = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    device = query.device
    tail_allowed = _tail_allowed(mask_2d, batch, q_len, t_len, device)
    own_heads = _own_heads(heads, groups, device, layer.slot_heads.dtype)
    offsets = layer.row_offsets
    queries = query.to(compute) * scale  # [B, H, Q, D]; scaling the queries scales every score
    outs, probs = [], []
    for row in range(batch):
        start, stop = offsets[row], offsets[row + 1]
        n = stop - start
        keys = layer.flat_keys[start:stop].to(compute)
        values = layer.flat_values[start:stop].to(compute)
        q = queries[row]  # [H, Q, D]
        scores = torch.empty((heads, q_len, n + t_len), dtype=compute, device=device)
        flat_scores = scores.view(heads * q_len, n + t_len)
        torch.mm(q.reshape(heads * q_len, dim), keys.T, out=flat_scores[:, :n])
        torch.matmul(
            q.reshape(kv_heads, groups * q_len, dim),
            tail_keys[row].to(compute).transpose(1, 2),
            out=flat_scores[:, n:].view(kv_heads, groups * q_len, t_len),
        )
        if softcap is not None:
            scores.div_(softcap).tanh_().mul_(softcap)
        other = layer.slot_heads[start:stop][None, None, :] != own_heads
        scores[..., :n].masked_fill_(other, float("-inf"))
        if tail_allowed is not None:
            scores[..., n:].masked_fill_(~tail_allowed[row][None], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        if layer.empty_rows[row] and tail_allowed is not None:
            p = p.nan_to_num_(0.0)  # a query seeing nothing (an empty segment, padded tail): no output, as padding
        p2 = p.view(heads * q_len, n + t_len)
        out = torch.matmul(p2[:, n:].view(kv_heads, groups * q_len, t_len), tail_values[row].to(compute))
        out = torch.addmm(out.view(heads * q_len, dim), p2[:, :n], values)
        outs.append(out.view(heads, q_len, dim).transpose(0, 1))
        if eager:
            probs.append(_padded_probs(layer, row, p, kv_heads, groups, q_len, n))
    out = (outs[0][None] if batch == 1 else torch.stack(outs)).to(query.dtype)
    return out, (torch.stack(probs).to(query.dtype) if eager else None)


_OWN_HEADS: dict = {}


def _own_heads(heads: int, groups: int, device, dtype) -> torch.Tensor:
    """[H, 1, 1] the kv head each query head reads (cached per shape, device and dtype)."""
    key = (heads, groups, str(device), dtype)
    own = _OWN_HEADS.get(key)
    if own is None:
        own = torch.arange(heads, device=device).div_(groups, rounding_mode="floor").to(dtype)[:, None, None]
        _OWN_HEADS[key] = own
    return own


def _in_chunks(module, query, layer, tail_keys, tail_values, mask_2d, eager, scaling, softcap):
    """flat_attention over pieces of QUERY_CHUNK queries: piece [a, b) sees the tail up to its last query."""
    q_len, t_len = query.shape[2], tail_keys.shape[2]
    outs, probs = [], []
    for a in range(0, q_len, QUERY_CHUNK):
        b = min(q_len, a + QUERY_CHUNK)
        seen = t_len - q_len + b  # tail tokens up to query b - 1
        mask = None if mask_2d is None else mask_2d[:, : mask_2d.shape[1] - (q_len - b)]
        out, p = flat_attention(
            module,
            query[:, :, a:b],
            layer,
            tail_keys[:, :, :seen],
            tail_values[:, :, :seen],
            mask,
            eager,
            scaling=scaling,
            softcap=softcap,
        )
        outs.append(out)
        if eager:
            probs.append(torch.nn.functional.pad(p, (0, t_len - seen)))
    return torch.cat(outs, dim=1), (torch.cat(probs, dim=2) if eager else None)


def _check_call(module, dropout, kwargs) -> None:
    """Refuse what the flat attention does not implement (never a silently different result)."""
    given = [name for name in _REFUSED if kwargs.get(name) is not None]
    if kwargs.get("sliding_window") is not None:
        given.append("sliding_window")
    if given:
        raise ValueError(
            f"the flat cache layout's attention does not implement {', '.join(given)} (layer "
            f"{getattr(module, 'layer_idx', '?')}); use layout='padded'"
        )
    if dropout and getattr(module, "training", False):
        raise ValueError("the flat cache layout's attention has no dropout: put the model in eval() mode")


def _tail_allowed(mask_2d, batch: int, q_len: int, t_len: int, device) -> torch.Tensor | None:
    """bool [B, Q, T]: the tail tokens each new query sees (causal, real), None when it sees all of them."""
    allowed = None
    if mask_2d is not None:
        real = mask_2d[:, -t_len:].to(device=device, dtype=torch.bool)
        if not bool(real.all()):
            allowed = real[:, None, :].expand(batch, q_len, t_len)
    if q_len > 1:
        causal = (
            torch.arange(t_len, device=device)[None, :] <= torch.arange(t_len - q_len, t_len, device=device)[:, None]
        )
        allowed = causal[None].expand(batch, q_len, t_len) if allowed is None else allowed & causal
    return allowed


def _padded_probs(layer, row: int, p: torch.Tensor, kv_heads: int, groups: int, q_len: int, n: int) -> torch.Tensor:
    """[H, Q, K + T] probabilities at the padded layout's slots (zeros at its padding slots) of one row."""
    base = layer.state.base_len
    t_len = p.shape[-1] - n
    slots = layer.state.slots[row].expand(kv_heads, base)
    head_of, slot_of = slots.nonzero(as_tuple=True)  # the row's flat slots, in their stored order
    p3 = p.view(kv_heads, groups * q_len, n + t_len)
    out = p.new_zeros((kv_heads, groups * q_len, base + t_len))
    out[head_of, :, slot_of] = p3[head_of, :, torch.arange(n, device=p.device)]
    out[:, :, base:] = p3[:, :, n:]
    return out.view(kv_heads * groups, q_len, base + t_len)
