"""H2O's per-key attention sums on CUDA in two Triton kernels, with no L x S matrix in memory.

The torch form (`attention_stats.accumulated_attention`) walks 64-128-query chunks: on a GPU that is
hundreds of small kernels per layer, and a chunk of scores is the largest temporary of the prefill.
Here the sums come in two passes over blocks of scores that live only in registers:

1. `_row_lse`: per query, the log-sum-exp of its allowed scores (flash-attention's forward without V);
2. `_key_sums`: per key block, sum over the queries of exp(score - lse), the softmax probabilities.

Both passes skip the blocks a causal mask hides. Exact up to float rounding: fp32 models use IEEE fp32
products (no TF32), half-precision models multiply in their dtype and accumulate in fp32, as sdpa does.
Triton is imported only when this module is (a CUDA prefill of a strategy that needs the sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634

# one tile shape, checked on an H200 (bench in docs/bench/device_check.sh). An autotuner over six shapes
# was tried: compiling every shape for every mask / dtype variant took minutes on the first prompts.
_BLOCK = 64


@triton.jit
def _scores(
    q,
    k_t,
    offs_m,
    offs_n,
    mask_ptr,
    L,
    S,
    offset,
    scale_log2,
    s_mm,
    s_mn,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Scores of a [BLOCK_M, BLOCK_N] block in the log2 domain, -inf where the query may not see the key."""
    if IEEE:
        s = tl.dot(q, k_t, input_precision="ieee")
    else:
        s = tl.dot(q, k_t)
    s = s * scale_log2
    ok = (offs_m[:, None] < L) & (offs_n[None, :] < S)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + offset)
    if HAS_MASK:
        allowed = tl.load(mask_ptr + offs_m[:, None] * s_mm + offs_n[None, :] * s_mn, mask=ok, other=0)
        ok = ok & (allowed != 0)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _row_lse(
    Q,
    K,
    MASK,
    LSE,
    L,
    S,
    offset,
    scale_log2,
    HEADS,
    GROUPS,
    D,
    s_qb,
    s_qh,
    s_qm,
    s_qd,
    s_kb,
    s_kh,
    s_kn,
    s_kd,
    s_mb,
    s_mh,
    s_mm,
    s_mn,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
        mask=(offs_m[:, None] < L) & (offs_d[None, :] < D),
        other=0.0,
    )
    k_base = K + b * s_kb + (h // GROUPS) * s_kh
    mask_ptr = MASK + b * s_mb + h * s_mh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    hi = S
    if CAUSAL:
        # past S only for the last query block: those keys are masked, the loads too
        hi = (pid_m + 1) * BLOCK_M + offset
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = tl.load(
            k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
            mask=(offs_n[None, :] < S) & (offs_d[:, None] < D),
            other=0.0,
        )
        s = _scores(q, k_t, offs_m, offs_n, mask_ptr, L, S, offset, scale_log2, s_mm, s_mn, HAS_MASK, CAUSAL, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    # a query that may see no key (a padded one) gets +inf: exp(score - inf) = 0 in the second pass
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i + (l_i == 0)), float("inf"))
    tl.store(LSE + bh * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _key_sums(
    Q,
    K,
    MASK,
    LSE,
    VALID,
    OUT,
    L,
    S,
    offset,
    scale_log2,
    HEADS,
    GROUPS,
    D,
    s_qb,
    s_qh,
    s_qm,
    s_qd,
    s_kb,
    s_kh,
    s_kn,
    s_kd,
    s_mb,
    s_mh,
    s_mm,
    s_mn,
    s_vb,
    s_vm,
    HAS_MASK: tl.constexpr,
    HAS_VALID: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_t = tl.load(
        K + b * s_kb + (h // GROUPS) * s_kh + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
        mask=(offs_n[None, :] < S) & (offs_d[:, None] < D),
        other=0.0,
    )
    q_base = Q + b * s_qb + h * s_qh
    mask_ptr = MASK + b * s_mb + h * s_mh
    total = tl.zeros([BLOCK_N], tl.float32)
    lo = 0
    if CAUSAL:
        # the first query that can see this block's first key, rounded down to a query block
        lo = pid_n * BLOCK_N - offset
        lo = lo * (lo > 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(
            q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
            mask=(offs_m[:, None] < L) & (offs_d[None, :] < D),
            other=0.0,
        )
        lse = tl.load(LSE + bh * L + offs_m, mask=offs_m < L, other=float("inf"))
        s = _scores(q, k_t, offs_m, offs_n, mask_ptr, L, S, offset, scale_log2, s_mm, s_mn, HAS_MASK, CAUSAL, IEEE)
        p = tl.exp2(s - lse[:, None])
        if HAS_VALID:
            valid = tl.load(VALID + b * s_vb + offs_m * s_vm, mask=offs_m < L, other=0)
            p = tl.where(valid[:, None] != 0, p, 0.0)
        total += tl.sum(p, 0)
    tl.store(OUT + bh * S + offs_n, total, mask=offs_n < S)


def accumulated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    allowed: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    within_causal: bool = False,
) -> torch.Tensor:
    """Per-key sum of attention probabilities over all valid queries, [B, H, S] float32 (H2O scores).

    Same contract as `attention_stats.accumulated_attention`. query [B, H, L, D], key [B, Hkv, S, D].
    allowed: bool [B, 1|H, L, S] or None (plain causal); within_causal: the caller knows `allowed` hides
    every key after the query's own position, so the causal block skipping applies to it too.
    """
    b, h, length, d = query.shape
    kv_heads, s_len = key.shape[1], key.shape[2]
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        query, key = query.float(), key.float()
    key = key.to(query.dtype)
    device = query.device
    causal = allowed is None or within_causal
    if allowed is not None:
        mask = allowed.view(torch.uint8) if allowed.dtype == torch.bool else allowed.to(torch.uint8)
        mask = mask.expand(b, mask.shape[1], length, s_len)
        s_mb, s_mh, s_mm, s_mn = mask.stride()
        if mask.shape[1] == 1:
            s_mh = 0
    else:
        mask = torch.empty(1, dtype=torch.uint8, device=device)
        s_mb = s_mh = s_mm = s_mn = 0
    if query_valid is not None:
        valid = query_valid.to(torch.uint8)
        s_vb, s_vm = valid.stride()
    else:
        valid = torch.empty(1, dtype=torch.uint8, device=device)
        s_vb = s_vm = 0
    ieee = query.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    lse = torch.empty((b, h, length), dtype=torch.float32, device=device)
    out = torch.empty((b, h, s_len), dtype=torch.float32, device=device)
    block_d = triton.next_power_of_2(d)
    block = _BLOCK if block_d <= 128 else _BLOCK // 2
    common = (
        s_len - length,
        scale * _LOG2E,
        h,
        h // kv_heads,
        d,
        *query.stride(),
        *key.stride(),
        s_mb,
        s_mh,
        s_mm,
        s_mn,
    )
    flags = dict(HAS_MASK=allowed is not None, CAUSAL=causal, IEEE=ieee, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d)
    _row_lse[(triton.cdiv(length, block), b * h)](query, key, mask, lse, length, s_len, *common, **flags)
    _key_sums[(triton.cdiv(s_len, block), b * h)](
        query,
        key,
        mask,
        lse,
        valid,
        out,
        length,
        s_len,
        *common,
        s_vb,
        s_vm,
        HAS_VALID=query_valid is not None,
        **flags,
    )
    return out
