"""Attention statistics from post-RoPE queries and keys, in query chunks (never an L x L matrix).

The framework calls these inside its attention-function wrapper during prefill. Where a strategy
needs every query's probabilities and the attention is plain causal on CPU, the attention output
and the statistics come from one pass (`attention_with_accumulated`); otherwise the model runs its
own kernel and only the statistics a strategy asked for are computed beside it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

# upper bound on one chunk of scores (elements), ~32 MB in fp32
_CHUNK_ELEMENTS = 8 * 1024 * 1024
_MAX_CHUNK = 128
_LOG2E = 1.4426950408889634
# queries per chunk in the one-pass layout (x the heads of a kv group: one matmul per kv head serves them all);
# 32-128 tried, 64 fastest on CPU; dividing it by the group size instead made GQA models ~1.6x slower
_ONE_PASS_QUERIES = 64


def _chunk_size(batch: int, heads: int, keys: int) -> int:
    return max(8, min(_MAX_CHUNK, _CHUNK_ELEMENTS // max(1, batch * heads * keys)))


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, q, D] -> [B, Hkv, G*q, D] so one matmul per kv head serves its whole query group."""
    b, h, q, d = query.shape
    return query.reshape(b, kv_heads, (h // kv_heads) * q, d)


def allowed_from_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The model's 4-D mask (bool or additive float) -> bool 'may attend', or None for plain causal."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask == 0


def window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    window: int,
    allowed: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax probabilities of the last `window` queries over all keys: [B, H, w, S] float32.

    query [B, H, L, D], key [B, Hkv, S, D] (S >= L, the last L keys belong to the queries).
    allowed: bool [B, 1|H, L, S] or None (causal). query_valid: bool [B, L]; padded queries give zero rows.
    """
    b, h, length, d = query.shape
    kv_heads, s_len = key.shape[1], key.shape[2]
    w = min(window, length)
    q = _grouped(query[:, :, length - w :].float() * scale, kv_heads)
    scores = torch.matmul(q, key.float().transpose(-1, -2)).view(b, h, w, s_len)
    if allowed is not None:
        scores.masked_fill_(~allowed[:, :, length - w :, :], float("-inf"))
    else:
        q_pos = torch.arange(s_len - w, s_len, device=query.device)[:, None]
        scores.masked_fill_(torch.arange(s_len, device=query.device)[None, :] > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    if query_valid is not None:
        probs.mul_(query_valid[:, None, length - w :, None].to(probs.dtype))
    return probs


def causal_with_key_padding(allowed: torch.Tensor, valid: torch.Tensor) -> bool:
    """True when every real query's row of `allowed` (bool [B, 1|H, L, S]) is exactly "causal, and the key
    is real" (valid: bool [B, L]): the mask of a padded batch, which the one-pass form can apply itself.
    Rows of padded queries are not looked at (models differ in what they put there)."""
    b, heads, length, s_len = allowed.shape
    if heads != 1 or length != s_len or tuple(valid.shape) != (b, length):
        return False
    expected = torch.ones((length, length), dtype=torch.bool, device=allowed.device).tril_() & valid[:, None, :]
    return not bool(((allowed[:, 0] != expected) & valid[:, :, None]).any())


def attention_with_accumulated(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, key_valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal attention output [B, H, L, D] and the per-key probability sums [B, H, L] in one pass.

    H2O-style statistics need every query's probabilities, which a fused kernel never exposes; a
    second pass over the scores costs about as much as the attention itself. Here each query chunk's
    scores are formed once, laid out keys x queries, normalised, then summed over queries (contiguous
    memory) and multiplied with the values: ~25% less time on CPU than the fused kernel plus a
    statistics pass (docs/bench). The block of one chunk stays in cache between the steps.
    key_valid (bool [B, L]) adds key padding to the causal mask (a left-padded batch): padded keys get
    no probability, and padded queries contribute nothing and get a zero output.
    Returns None where it does not apply (not CPU, or S != L); callers then run the model's own
    attention and `accumulated_attention`.
    """
    result = attention_with_statistics(query, key, value, scale, key_valid)
    return None if result is None else result[:2]


def attention_with_statistics(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    query_set: torch.Tensor | None = None,
    sparsity: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """`attention_with_accumulated` with the sums over a query set and VL-Cache's sparsity in the same pass.

    query_set: bool [B, L] queries the sums and the sparsity cover (None: every real query); the output is
    every query's. sparsity > 0: also [B, H], the share of the set's visible (query, key) entries below
    sparsity x the query's largest probability (that largest probability is the column's normaliser, since
    the shifted maximum exponentiates to 1). Returns (output, sums, sparsity or None), or None (not CPU, S != L).
    """
    if query.device.type != "cpu" or key.shape[2] != query.shape[2]:
        return None
    b, h, length, d = query.shape
    kv_heads = key.shape[1]
    groups = h // kv_heads
    # base 2 throughout: exp2 is ~1.5x faster than exp on CPU
    q = (query.float() * (scale * _LOG2E)).view(b, kv_heads, groups, length, d)
    k, v = key.float(), value.float()
    out = torch.empty((b, kv_heads, groups, length, v.shape[-1]), dtype=torch.float32, device=query.device)
    total = torch.zeros((b, kv_heads, length, groups), dtype=torch.float32, device=query.device)
    weight = None
    if query_set is not None:
        weight = (query_set if key_valid is None else query_set & key_valid).float()
    if sparsity > 0:
        # keys a query at position p sees: the real ones up to p
        visible = (
            torch.arange(1, length + 1, device=query.device).expand(b, length)
            if key_valid is None
            else key_valid.long().cumsum(-1)
        ).float()
        counted = weight if weight is not None else (None if key_valid is None else key_valid.float())
        below = torch.zeros((b, kv_heads, groups), dtype=torch.float32, device=query.device)
        seen = torch.zeros((b,), dtype=torch.float32, device=query.device)
    chunk = _ONE_PASS_QUERIES
    tri = None
    for i0 in range(0, length, chunk):
        i1 = min(length, i0 + chunk)
        c = i1 - i0
        q_t = q[:, :, :, i0:i1].reshape(b, kv_heads, groups * c, d).transpose(-1, -2)
        # causal: keys after the chunk's last query are invisible to all of it
        scores = torch.matmul(k[:, :, :i1], q_t)  # [B, Hkv, i1, G*c]
        if tri is None or tri.shape[0] != c:
            tri = torch.ones((c, c), dtype=torch.bool, device=query.device).tril_(-1)[:, None, :]
        scores.view(b, kv_heads, i1, groups, c)[:, :, i1 - c :].masked_fill_(tri, float("-inf"))
        if key_valid is None:
            scores.sub_(scores.amax(dim=2, keepdim=True)).exp2_()
            norm = scores.sum(dim=2, keepdim=True).reciprocal_()
        else:
            scores.masked_fill_(~key_valid[:, None, :i1, None], float("-inf"))
            top = scores.amax(dim=2, keepdim=True)
            top.masked_fill_(top == float("-inf"), 0.0)  # a padded query sees no key: its column stays 0
            scores.sub_(top).exp2_()
            norm = scores.sum(dim=2, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny).reciprocal_()
            norm.view(b, kv_heads, 1, groups, c).mul_(key_valid[:, None, None, None, i0:i1])
        scores.mul_(norm)
        if weight is None:
            total[:, :, :i1] += scores.view(b, kv_heads, i1, groups, c).sum(dim=-1)
        else:
            summed = torch.matmul(scores.view(b, kv_heads, i1 * groups, c), weight[:, None, i0:i1, None])
            total[:, :, :i1] += summed.view(b, kv_heads, i1, groups)
        if sparsity > 0:
            # entries below the threshold, hidden ones (probability 0) taken back out: i1 - visible per query
            low = (scores < norm * sparsity).sum(dim=2).view(b, kv_heads, groups, c).float()
            low -= (i1 - visible[:, i0:i1])[:, None, None, :]
            rows = visible[:, i0:i1] if counted is None else visible[:, i0:i1] * counted[:, i0:i1]
            below += low.mul_(1.0 if counted is None else counted[:, None, None, i0:i1]).sum(-1)
            seen += rows.sum(-1)
        out[:, :, :, i0:i1] = torch.matmul(scores.transpose(-1, -2), v[:, :, :i1]).view(b, kv_heads, groups, c, -1)
    share = None
    if sparsity > 0:
        share = (below / seen.clamp(min=1)[:, None, None]).reshape(b, h)
    return out.view(b, h, length, -1).to(query.dtype), total.permute(0, 1, 3, 2).reshape(b, h, length), share


def accumulated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    allowed: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    within_causal: bool = False,
) -> torch.Tensor:
    """Per-key sum of attention probabilities over all valid queries: [B, H, S] float32 (H2O scores).

    Exact, computed in query chunks next to the model's own attention (any mask, any device);
    `attention_with_accumulated` is the faster one-pass form for plain causal prefill on CPU, and on
    CUDA the two Triton kernels of `attention_stats_triton` do it when Triton is installed.
    allowed: bool [B, 1|H, L, S] or None for plain causal (then the upper triangle is skipped).
    query_valid: bool [B, L] the queries summed over (padding, or any query set); others count nothing.
    within_causal: `allowed` is known to hide every key after the query's position (`hides_future`).
    """
    if query.is_cuda:
        kernels = _triton_stats()
        if kernels is not None:
            return kernels.accumulated_attention(query, key, scale, allowed, query_valid, within_causal)
    b, h, _, _ = query.shape
    s_len = key.shape[2]
    total = torch.zeros((b, h, s_len), dtype=torch.float32, device=query.device)
    for _, probs, _ in _probability_chunks(query, key, scale, allowed, query_valid, within_causal):
        total[..., : probs.shape[-1]] += probs.sum(dim=2)
    return total


@dataclass
class QueryStatistics:
    """What `query_statistics` gathered over a query set (each None unless asked for).

    accumulated: [B, H, S] per-key probability sums.
    sparsity:    [B, H] share of visible (query, key) entries below threshold x the query's largest probability.
    cross_modal: (mass [B, H, 3, 3], entropy [B, H, 3, 3], queries [B, 3, 3]) over (query group, key group),
                 the groups of `layer.CROSS_GROUPS` (see `layer.CrossModal`).
    """

    accumulated: torch.Tensor | None = None
    sparsity: torch.Tensor | None = None
    cross_modal: tuple | None = None


class StatisticsReducer:
    """Accumulates statistics over chunks of probabilities [B, H, c, K] (the first K keys of S).

    One reducer serves the chunked pass and the eager probabilities alike, so both give the same numbers.
    key_groups: float [B, S, 3] one-hot (text, vision, any real key) for the cross-modal tables, or None;
    query_groups: float [B, L, 3] the same for the queries, zero on queries outside the set.
    """

    def __init__(self, b, h, s_len, device, sums=True, sparsity=0.0, key_groups=None, query_groups=None):
        self.sums = torch.zeros((b, h, s_len), dtype=torch.float32, device=device) if sums else None
        self.threshold = sparsity
        if sparsity > 0:
            self.below = torch.zeros((b, h), dtype=torch.float32, device=device)
            self.seen = torch.zeros((b, h), dtype=torch.float32, device=device)
        self.key_groups, self.query_groups = key_groups, query_groups
        if key_groups is not None:
            n = key_groups.shape[-1]
            self.mass = torch.zeros((b, h, n, n), dtype=torch.float32, device=device)
            self.entropy = torch.zeros((b, h, n, n), dtype=torch.float32, device=device)
            self.counted = torch.zeros((b, n, n), dtype=torch.float32, device=device)

    def add(self, probs: torch.Tensor, i0: int, visible: torch.Tensor | None, query_valid: torch.Tensor | None):
        """probs [B, H, c, K] of queries i0..i0+c (zero rows outside the set); visible: bool broadcastable to
        probs, the entries the mask let through (needed for sparsity); query_valid [B, L] or None."""
        c, k_len = probs.shape[2], probs.shape[3]
        if self.sums is not None:
            self.sums[..., :k_len] += probs.sum(dim=2)
        if self.threshold > 0:
            rows = None if query_valid is None else query_valid[:, None, i0 : i0 + c, None]
            seen = visible if rows is None else visible & rows
            top = probs.amax(dim=-1, keepdim=True)
            below = (probs < top * self.threshold) & seen
            self.below += below.sum(dim=(-1, -2)).float().expand_as(self.below)
            self.seen += seen.sum(dim=(-1, -2)).float().expand_as(self.seen)
        if self.key_groups is not None:
            groups = self.key_groups[:, :k_len]
            mass = torch.einsum("bhck,bkg->bhcg", probs, groups)
            plogp = torch.einsum("bhck,bkg->bhcg", torch.special.xlogy(probs, probs), groups)
            present = mass > 0
            entropy = torch.where(present, mass.clamp(min=1e-30).log() - plogp / mass.clamp(min=1e-30), 0.0)
            q_groups = self.query_groups[:, i0 : i0 + c]
            self.mass += torch.einsum("bhcg,bcq->bhqg", mass, q_groups)
            self.entropy += torch.einsum("bhcg,bcq->bhqg", entropy, q_groups)
            self.counted += torch.einsum("bcg,bcq->bqg", present.any(dim=1).float(), q_groups)

    def result(self) -> QueryStatistics:
        out = QueryStatistics(accumulated=self.sums)
        if self.threshold > 0:
            out.sparsity = self.below / self.seen.clamp(min=1)
        if self.key_groups is not None:
            out.cross_modal = (self.mass, self.entropy, self.counted)
        return out


def query_statistics(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    allowed: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    within_causal: bool = False,
    sums: bool = True,
    sparsity: float = 0.0,
    key_groups: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
) -> QueryStatistics:
    """Sums, sparsity and cross-modal tables of the valid queries' probabilities in one chunked pass.

    Same arguments as `accumulated_attention` (the torch form on every device: Triton computes sums only);
    sparsity / key_groups / query_groups as in `StatisticsReducer`.
    """
    b, h, _, _ = query.shape
    reducer = StatisticsReducer(b, h, key.shape[2], query.device, sums, sparsity, key_groups, query_groups)
    need_visible = sparsity > 0
    for i0, probs, visible in _probability_chunks(query, key, scale, allowed, query_valid, within_causal, need_visible):
        reducer.add(probs, i0, visible, query_valid)
    return reducer.result()


def _probability_chunks(query, key, scale, allowed, query_valid, within_causal, need_visible=False):
    """Yield (i0, probs [B, H, c, k_end], visible) per query chunk: probabilities of queries i0..i0+c over the
    first k_end keys (the rest are hidden from all of them), zero rows for queries outside query_valid.
    visible: bool [B, 1|H, c, k_end] entries the mask lets through (need_visible), else None."""
    b, h, length, d = query.shape
    kv_heads, s_len = key.shape[1], key.shape[2]
    groups = h // kv_heads
    offset = s_len - length
    q_all = query.float() * scale
    k_t = key.float().transpose(-1, -2)
    chunk = _chunk_size(b, h, s_len)
    starts = range(0, length, chunk)
    # causal: queries of a chunk see keys up to their own position only. Under a mask, a chunk whose
    # queries see nothing beyond that point (causal + padding: every chunk) is cut there too, which halves
    # the matmul; the checks are queued first and read back once (one device sync, not one per chunk).
    ends = [offset + min(length, i0 + chunk) for i0 in starts]
    if allowed is not None and not within_causal:
        beyond = torch.stack([allowed[:, :, i0 : e - offset, e:].any() for i0, e in zip(starts, ends)]).tolist()
        ends = [s_len if seen else e for e, seen in zip(ends, beyond)]
    tri = None
    for i0, k_end in zip(starts, ends):
        i1 = min(length, i0 + chunk)
        c = i1 - i0
        q = _grouped(q_all[:, :, i0:i1], kv_heads)
        scores = torch.matmul(q, k_t[..., :k_end]).view(b, kv_heads, groups, c, k_end)
        visible = None
        if allowed is not None:
            blocked = ~allowed[:, :, i0:i1, :k_end]
            if need_visible:
                visible = ~blocked
            if blocked.shape[1] == 1:
                blocked = blocked[:, :, None]
            else:
                blocked = blocked.reshape(b, kv_heads, groups, c, k_end)
            scores.masked_fill_(blocked, float("-inf"))
        else:
            if tri is None or tri.shape[0] != c:
                tri = torch.ones((c, c), dtype=torch.bool, device=query.device).triu_(1)
            scores[..., k_end - c :].masked_fill_(tri, float("-inf"))
            if need_visible:
                visible = torch.ones((c, k_end), dtype=torch.bool, device=query.device)
                visible[:, k_end - c :] = ~tri
                visible = visible[None, None]
        row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        # fully blocked rows (padding queries) have lse = -inf or a huge negative value: make them contribute 0
        row_lse = torch.where(row_lse < -1e30, float("inf"), row_lse)
        scores.sub_(row_lse)
        scores.exp_()
        if query_valid is not None:
            scores.mul_(query_valid[:, None, None, i0:i1, None].to(scores.dtype))
        yield i0, scores.view(b, h, c, k_end), visible


def gather_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    positions: torch.Tensor,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax probabilities of chosen queries over all keys: [B, H, Q, S] float32.

    positions: long [B, Q] index of each row's query among the L queries, -1 for a zero row (a set with fewer
    queries than Q). query [B, H, L, D], key [B, Hkv, S, D]; allowed: bool [B, 1|H, L, S] or None (causal).
    """
    b, h, length, d = query.shape
    kv_heads, s_len = key.shape[1], key.shape[2]
    n = positions.shape[1]
    at = positions.clamp(min=0)
    q = torch.gather(query, 2, at[:, None, :, None].expand(b, h, n, d)).float() * scale
    scores = torch.matmul(_grouped(q, kv_heads), key.float().transpose(-1, -2)).view(b, h, n, s_len)
    if allowed is not None:
        rows = torch.gather(allowed, 2, at[:, None, :, None].expand(b, allowed.shape[1], n, s_len))
        scores.masked_fill_(~rows, float("-inf"))
    else:
        hidden = torch.arange(s_len, device=query.device)[None, None, :] > (s_len - length + at)[:, :, None]
        scores.masked_fill_(hidden[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    return probs.mul_((positions >= 0)[:, None, :, None].to(probs.dtype))


def last_positions(members: torch.Tensor, count: int) -> torch.Tensor:
    """long [B, count]: the positions of each row's last `count` True entries of members (bool [B, L]),
    ascending, left-padded with -1 where a row has fewer."""
    length = members.shape[1]
    index = torch.where(members, torch.arange(length, device=members.device), -1)
    top = index.topk(min(count, length), dim=-1).values  # descending; -1 last
    return top.flip(-1)


def elite_positions(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    query_text: torch.Tensor,
    key_text: torch.Tensor,
    count: int,
    threshold: float,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """AirCache's elite observation window: long [B, Q] query positions (ascending, -1 padded), Q = min(count, L).

    The reference is each row's last real text query (its last real query if it has none); its attention over the
    text keys it sees is a softmax restricted to them, averaged over the heads. Elite are the text queries whose
    key gets at least threshold x the largest of those probabilities, the `count` strongest of them (the
    reference itself when none qualifies, e.g. when the strongest text keys are in a compressed past).
    query_text: bool [B, L] real text queries; key_text: bool [B, S] text keys (the last L are the queries').
    """
    b, h, length, d = query.shape
    kv_heads, s_len = key.shape[1], key.shape[2]
    offset = s_len - length
    positions = torch.arange(length, device=query.device)
    ref = torch.where(query_text, positions, -1).amax(-1)
    ref = torch.where(ref >= 0, ref, length - 1)
    q = torch.gather(query, 2, ref[:, None, None, None].expand(b, h, 1, d)).float() * scale
    scores = torch.matmul(_grouped(q, kv_heads), key.float().transpose(-1, -2)).view(b, h, s_len)
    if allowed is not None:
        sees = torch.gather(allowed, 2, ref[:, None, None, None].expand(b, allowed.shape[1], 1, s_len))[:, :, 0]
    else:
        sees = (torch.arange(s_len, device=query.device)[None, :] <= (offset + ref)[:, None])[:, None]
    scores.masked_fill_(~(sees & key_text[:, None, :]), float("-inf"))
    relevancy = torch.softmax(scores, dim=-1).nan_to_num_(0.0).mean(1)  # [B, S]
    top = relevancy.amax(-1, keepdim=True)
    mine = relevancy[:, offset:]
    elite = query_text & (mine >= threshold * top) & (mine > 0)
    none = ~elite.any(-1)
    elite = elite | (none[:, None] & (positions[None, :] == ref[:, None]))
    n = min(count, length)
    strongest = torch.where(elite, mine, float("-inf")).topk(n, dim=-1)
    chosen = torch.where(strongest.values > float("-inf"), strongest.indices, -1)
    return chosen.sort(dim=-1).values


def hides_future(allowed: torch.Tensor, chunk: int = 1024) -> bool:
    """Whether bool `allowed` [B, 1|H, L, S] lets no query see a key after its own position (the last L keys
    are the queries'): true of causal masks with padding or a sliding window, false of bidirectional image
    blocks. Checked in row chunks (no second L x S tensor), one device sync."""
    length, s_len = allowed.shape[-2], allowed.shape[-1]
    offset = s_len - length
    future = [
        torch.triu(allowed[..., i0 : i0 + chunk, :], diagonal=i0 + offset + 1).any() for i0 in range(0, length, chunk)
    ]
    return not bool(torch.stack(future).any())


@functools.lru_cache(maxsize=1)
def _load_triton_stats():
    try:
        from . import attention_stats_triton
    except ImportError:  # no Triton: the chunked torch form serves CUDA too
        return None
    return attention_stats_triton


def _triton_stats():
    """The Triton kernels module, or None without Triton or with KVPRESS_MM_TRITON=0 (compare the two forms)."""
    if os.environ.get("KVPRESS_MM_TRITON", "1") == "0":
        return None
    return _load_triton_stats()
