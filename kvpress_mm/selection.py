"""Selection helpers shared by strategies: protected windows, per-kv-head reduction, top-k keep."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layer import LayerKV


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
