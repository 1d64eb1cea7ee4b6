"""Selection helpers shared by strategies: protected windows, per-kv-head reduction, top-k keep, budget splits
(proportional counts with the total held, cross-layer allocation) and span-level selection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layer import LayerKV
from .modality import Modality
from .validate import check_choice, check_int, warn_ignored


def as_row_counts(n, layer: LayerKV) -> torch.Tensor:
    """An int or a [batch] tensor -> a [batch] long tensor on the layer's device."""
    if isinstance(n, torch.Tensor):
        return n.to(device=layer.keys.device, dtype=torch.long)
    return torch.full((layer.batch,), int(n), dtype=torch.long, device=layer.keys.device)


def first_tokens(layer: LayerKV, n) -> torch.Tensor:
    """[batch, seq] mask of each row's first n real tokens (attention sinks)."""
    n = as_row_counts(n, layer)
    return layer.valid & (layer.rank < n[:, None])


def last_tokens(layer: LayerKV, n) -> torch.Tensor:
    """[batch, seq] mask of each row's last n real tokens (recent / observation window)."""
    n = as_row_counts(n, layer)
    return layer.valid & (layer.rank >= (layer.n_valid - n)[:, None])


def per_kv_head(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Average query-head statistics [batch, heads, ...] over each kv head's group -> [batch, kv_heads, ...]."""
    if groups == 1:
        return x
    b, h = x.shape[:2]
    return x.reshape(b, h // groups, groups, *x.shape[2:]).mean(2)


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str = "avg") -> torch.Tensor:
    """Smooth [..., seq] scores along the sequence (SnapKV clustering), same length out."""
    if kernel_size <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    pad = kernel_size // 2
    if pooling == "avg":
        out = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=False)
    elif pooling == "max":
        out = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    else:
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
    return out[..., : shape[-1]].reshape(shape)


def tiered(scores: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Scores where every `first` position ([batch, seq] or [batch, heads, seq]) outranks every other.

    Ranks in float64 so that the order within each tier is the scores' own order.
    """
    scores = torch.nan_to_num(scores.double(), nan=0.0, posinf=0.0, neginf=0.0)
    offset = 2 * scores.abs().amax() + 1
    first = first if first.dim() == scores.dim() else first[:, None, :]
    return scores + first.double() * offset


def keep_top(
    scores: torch.Tensor,
    layer: LayerKV,
    keep: torch.Tensor | None = None,
    protect: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep, per (row, head), the protected positions plus the best-scoring others, `keep[row]` in all.

    scores: [batch, heads, seq] (higher = more important). protect / candidates: [batch, seq] or
    [batch, heads, seq] bool. Padding and non-candidates are never chosen. Returns bool [batch, heads, seq].
    """
    keep = layer.keep_count if keep is None else as_row_counts(keep, layer)
    b, h, length = scores.shape
    allowed = layer.valid[:, None, :]
    if candidates is not None:
        allowed = allowed & (candidates if candidates.dim() == 3 else candidates[:, None, :])
    rank = scores if scores.dtype == torch.float64 else scores.float()
    rank = torch.nan_to_num(rank, nan=float("-inf"))
    rank = rank.masked_fill(~allowed, float("-inf"))
    k_max = keep.max() if keep.numel() else keep.new_zeros(())
    if protect is not None:
        protect = (protect if protect.dim() == 3 else protect[:, None, :]) & allowed
        n_protected = protect.sum(-1)
        # one host read for the check and the count (on a GPU each read waits for the queued kernels)
        too_many, k_max = torch.stack([(n_protected > keep[:, None]).any().long(), k_max.long()]).tolist()
        if too_many:
            raise ValueError(
                f"more protected tokens ({int(n_protected.max())}) than the layer keeps ({int(keep.min())}); "
                "clip the protected windows to the budget"
            )
        rank = rank.masked_fill(protect, float("inf"))
    k_max = int(k_max)
    out = torch.zeros((b, h, length), dtype=torch.bool, device=scores.device)
    if k_max == 0:
        return out
    top = rank.topk(k_max, dim=-1).indices
    take = torch.arange(k_max, device=scores.device)[None, None, :] < keep[:, None, None]
    # a row may have fewer allowed positions than keep: never select a -inf slot
    take = take & (torch.gather(rank, -1, top) > float("-inf"))
    out.scatter_(-1, top, take)
    return out


def top_per_head(scores: torch.Tensor, counts: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, H, S]: the counts[b, h] best-scoring allowed positions of each (row, head).

    scores [B, H, S] (inf ranks first, nan last); counts long [B, H]; allowed bool [B, 1|H, S] or None. Never
    picks a position that is not allowed (a head with fewer allowed positions keeps fewer). No host read:
    the order is a full sort along S, not a top-k of a size read back.
    """
    rank = torch.nan_to_num(scores.double(), nan=float("-inf"), posinf=float("inf"))
    if allowed is not None:
        rank = rank.masked_fill(~allowed, float("-inf"))
    order = rank.argsort(dim=-1, descending=True, stable=True)
    take = torch.arange(scores.shape[-1], device=scores.device) < counts[..., None]
    take = take & (torch.gather(rank, -1, order) > float("-inf"))
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, take)


def proportional_counts(
    weights: torch.Tensor, total: torch.Tensor, high: torch.Tensor, low: torch.Tensor | int = 1
) -> torch.Tensor:
    """Split integer totals over bins in proportion to weights, within [low, high] per bin, the sum exact.

    weights: [..., n] >= 0 (all zero in a row: equal weights); total: long [...]; high / low: long [..., n]
    (or broadcastable). Water-filling: x_i = clamp(lambda * w_i, low_i, high_i) with lambda set so that the x_i
    sum to total, then floors and the largest remainders. A bin of zero weight stays at low until every other
    bin is at its high. Totals outside [sum(low), sum(high)] are clipped into it. Returns long [..., n].
    """
    w = weights.double().clamp(min=0)
    n = w.shape[-1]
    high = torch.as_tensor(high, device=w.device).double().expand_as(w)
    low = torch.as_tensor(low, device=w.device).double().expand_as(w).minimum(high)
    top = w.amax(-1, keepdim=True)
    w = torch.where(top > 0, w / top.clamp(min=1e-300), 1.0)
    w = w + 1e-9  # zero-weight bins fill last
    total = total.double().clamp(min=low.sum(-1), max=high.sum(-1))
    lam_lo = torch.zeros_like(total)
    lam_hi = (high.amax(-1) / w.amin(-1)).clamp(min=1.0) * 2
    for _ in range(80):
        mid = (lam_lo + lam_hi) / 2
        filled = (mid[..., None] * w).clamp(min=low, max=high).sum(-1)
        more = filled < total
        lam_lo = torch.where(more, mid, lam_lo)
        lam_hi = torch.where(more, lam_hi, mid)
    exact = (lam_hi[..., None] * w).clamp(min=low, max=high)
    exact = torch.where((exact - exact.round()).abs() < 1e-6, exact.round(), exact)  # bisection noise on integers
    counts = exact.floor().clamp(min=low)
    frac = exact - counts
    target = total.round()
    ranks = torch.arange(n, device=w.device)
    for _ in range(3):  # hand out (or take back) the rounding remainder, largest (smallest) fractions first
        short = target - counts.sum(-1)
        room = counts < high
        order = torch.where(room, frac, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, ranks.expand_as(order))
        counts = counts + (room & (rank < short[..., None])).double()
        extra = counts.sum(-1) - target
        spare = counts > low
        order = torch.where(spare, -frac, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, ranks.expand_as(order))
        counts = counts - (spare & (rank < extra[..., None])).double()
    return counts.long()


def allocate_layers(
    weights: torch.Tensor, n_valid: torch.Tensor, uniform: torch.Tensor, uniform_share: float = 0.0
) -> torch.Tensor:
    """Per-layer kept counts [n_layers, B] in proportion to weights [n_layers, B], the total held.

    Every row keeps n_layers x uniform tokens in all, as the uniform budget would; each layer between 1 and the
    row's real tokens. uniform_share mixes in equal weights first (EffiVLM-Bench: layer-adaptive budgets hurt at
    low budgets unless mixed with a uniform share): w <- share / n + (1 - share) * w / sum(w).
    """
    weights = weights.double().clamp(min=0)
    n_layers = weights.shape[0]
    norm = weights.sum(0, keepdim=True)
    share = torch.where(norm > 0, weights / norm.clamp(min=1e-300), 1.0 / n_layers)
    share = uniform_share / n_layers + (1.0 - uniform_share) * share
    counts = proportional_counts(
        share.T, uniform.long() * n_layers, n_valid.long()[:, None], torch.clamp(n_valid.long(), max=1)[:, None]
    )
    return counts.T


def span_ids(modality: torch.Tensor, size: int, image_rows: bool = True) -> torch.Tensor:
    """long [B, L] span index of every position (-1 on padding), for span-level selection.

    A span never crosses a modality change: each run of same-modality tokens is cut into chunks of `size`
    tokens from its start; with image_rows, an image / video run whose length is a square n x n is cut into its
    n patch rows instead (LLaVA's 24 x 24 grid), other runs into `size` chunks. Span ids increase along a row.
    """
    valid = modality != int(Modality.PAD)
    b, length = modality.shape
    index = torch.arange(length, device=modality.device).expand(b, length)
    before = torch.cat([torch.full_like(modality[:, :1], -1), modality[:, :-1]], dim=1)
    run_start = valid & (modality != before)
    start_at = torch.where(run_start, index, 0).cummax(dim=1).values
    offset = index - start_at
    run = run_start.long().cumsum(1) - 1
    run_len = torch.zeros((b, length + 1), dtype=torch.long, device=modality.device)
    run_len.scatter_add_(1, torch.where(valid, run, length), valid.long())
    run_len = torch.gather(run_len, 1, run.clamp(min=0))
    width = torch.full_like(run_len, size)
    if image_rows:
        side = run_len.double().sqrt().round().long()
        square = (side * side == run_len) & (side > 1)
        vision = (modality == int(Modality.IMAGE)) | (modality == int(Modality.VIDEO))
        width = torch.where(vision & square, side, width)
    new_span = valid & (offset % width == 0)
    return torch.where(valid, new_span.long().cumsum(1) - 1, -1)


def spans_from_boundaries(token_ids: torch.Tensor, modality: torch.Tensor, boundary_ids) -> torch.Tensor:
    """long [B, L] span ids where a span ends with any token of boundary_ids (e.g. a tokenizer's ".", "\\n")
    or at a modality change; -1 on padding. For strategies that know their tokenizer (the session has none)."""
    valid = modality != int(Modality.PAD)
    ends = torch.isin(token_ids, torch.as_tensor(list(boundary_ids), device=token_ids.device))
    before = torch.cat([torch.full_like(modality[:, :1], -1), modality[:, :-1]], dim=1)
    after_end = torch.cat([torch.ones_like(ends[:, :1]), ends[:, :-1]], dim=1)
    new_span = valid & ((modality != before) | after_end)
    return torch.where(valid, new_span.long().cumsum(1) - 1, -1)


def span_pool(scores: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Every position's score replaced by the largest score of its span: top-k then keeps spans whole.

    scores [B, H, S]; spans long [B, S] (span_ids; -1: a position of its own). Returns [B, H, S], same dtype.
    """
    b, h, length = scores.shape
    slot = torch.where(spans >= 0, spans, length).clamp(max=length)[:, None, :].expand(b, h, length)
    best = torch.full((b, h, length + 1), float("-inf"), dtype=scores.dtype, device=scores.device)
    best.scatter_reduce_(2, slot, scores, reduce="amax", include_self=True)
    pooled = torch.gather(best, 2, slot)
    return torch.where(spans[:, None, :] >= 0, pooled, scores)


SPAN_RULES = ("none", "chunks")


@dataclass
class SpanSelection:
    """Fields of strategies that can keep whole spans (text chunks, image patch rows) instead of single tokens.

    spans: "none" (token-level selection, the papers' own) or "chunks" (span_ids: runs of same-modality tokens
    cut into span_size chunks, image runs of n x n tokens into their patch rows); every token then ranks with
    its span's best score, so a kept span is kept whole (a 4-digit code is kept with all its digits).
    """

    spans: str = "none"
    span_size: int = 4

    def _check_spans(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "spans", self.spans, SPAN_RULES)
        check_int(owner, "span_size", self.span_size, minimum=1)
        if self.spans == "none" and self.span_size != 4:
            warn_ignored(owner, "span_size", self.span_size, 'spans="none" pools nothing')

    def pool_spans(self, scores: torch.Tensor, layer: LayerKV) -> torch.Tensor:
        """scores [B, H, S] pooled over the layer's spans (unchanged with spans="none")."""
        if self.spans == "none":
            return scores
        return span_pool(scores, span_ids(layer.modality, self.span_size))
