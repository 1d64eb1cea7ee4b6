"""SnapKV (Li et al., 2024, arXiv 2404.14469): what the observation window attends to, pooled."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_mm.layer import AttentionNeeds, LayerKV, Plan
from kvpress_mm.registry import register_strategy
from kvpress_mm.selection import SpanSelection, last_tokens, per_kv_head, pool_scores
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.validate import check_choice, check_int, warn_ignored

POOLINGS = ("avg", "max")


def prompt_memo(strategy, layer: LayerKV) -> dict:
    """A dict kept on `strategy` for what depends only on the prompt (its labels and kept counts), not on a
    layer's keys: the layers of one prompt share its entries (the framework hands them the same label and
    count tensors); a view of other tensors (the next prompt) starts an empty one."""
    memo = getattr(strategy, "_prompt_memo", None)
    if memo is None or memo["modality"] is not layer.modality or memo["keep_count"] is not layer.keep_count:
        memo = strategy._prompt_memo = {"modality": layer.modality, "keep_count": layer.keep_count}
    return memo


def keep_best(scores: torch.Tensor, layer: LayerKV, protect: torch.Tensor | None = None, memo=None) -> torch.Tensor:
    """`selection.keep_top(scores, layer, protect=protect)` without reading a size back to the host (on a GPU
    each read waits for the queued kernels): a full stable sort instead of a top-k. The same positions; among
    equal scores the earlier position first. protect: bool [batch, seq], at most keep_count per row (these
    strategies clip their windows to it). memo: a `prompt_memo` dict for the prompt-only parts."""
    memo = {} if memo is None else memo
    parts = memo.get(("keep_best", id(protect)))
    if parts is None or parts[0] is not protect:
        taken = torch.arange(layer.length, device=scores.device) < layer.keep_count[:, None]
        padding = ~layer.valid
        # one override for the prompt: -inf on padding, +inf on the protected positions
        fixed = padding if protect is None else padding | protect
        value = torch.where(padding, float("-inf"), float("inf"))
        parts = memo[("keep_best", id(protect))] = (protect, fixed[:, None, :], value[:, None, :], taken[:, None, :])
    _, fixed, value, taken = parts
    rank = torch.nan_to_num(scores if scores.dtype == torch.float64 else scores.float(), nan=float("-inf"))
    rank = torch.where(fixed, value.to(rank.dtype), rank)
    order = rank.argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros(rank.shape, dtype=torch.bool, device=rank.device).scatter_(-1, order, taken.expand_as(order))
    return keep & (rank > float("-inf"))  # nan scores are never kept (as keep_top)


@register_strategy("snapkv")
@dataclass
class SnapKV(SpanSelection, EvictionStrategy):
    """Keep the observation window and the prefix tokens it votes for.

    Algorithm (per row and kv head):
      1. window = the last `window_size` prompt tokens (kept, clipped to the budget)
      2. vote[j] = sum over window queries of softmax(q k^T)[j], averaged over the kv head's query group
      3. smooth the votes with a `kernel_size` pooling along the sequence (keeps neighbours together)
      4. keep the window plus the top-voted prefix tokens, `keep` in all
    spans="chunks" (this project's, not the paper's; kvpress_mm.selection.SpanSelection): after step 3 every
    token ranks with its span's best vote, so text chunks of span_size tokens and image patch rows are kept whole.
    """

    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "avg"

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_int(owner, "window_size", self.window_size, minimum=1)
        check_int(owner, "kernel_size", self.kernel_size, minimum=1)
        check_choice(owner, "pooling", self.pooling, POOLINGS)
        if self.kernel_size == 1 and self.pooling != "avg":
            warn_ignored(owner, "pooling", self.pooling, "kernel_size=1 pools nothing")
        self._check_spans()

    def needs(self) -> AttentionNeeds:
        return AttentionNeeds(window=self.window_size)

    def scores(self, layer: LayerKV) -> torch.Tensor:
        votes = layer.window_attention.sum(2)
        return self.pool_spans(pool_scores(per_kv_head(votes, layer.groups), self.kernel_size, self.pooling), layer)

    def promised(self, layer: LayerKV) -> torch.Tensor:
        return last_tokens(layer, torch.clamp(layer.keep_count, max=self.window_size))

    def plan(self, layer: LayerKV) -> Plan:
        memo = prompt_memo(self, layer)
        window = memo.get(("window", self.window_size))
        if window is None:  # the observation window depends on the prompt only
            window = memo[("window", self.window_size)] = self.promised(layer)
        return Plan(keep=keep_best(self.scores(layer), layer, protect=window, memo=memo))
