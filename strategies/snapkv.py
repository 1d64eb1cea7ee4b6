"""SnapKV (Li et al., 2024, arXiv 2404.14469): what the observation window attends to, pooled."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_mm.layer import AttentionNeeds, LayerKV, Plan
from kvpress_mm.registry import register_strategy
from kvpress_mm.selection import keep_top, last_tokens, per_kv_head, pool_scores
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.validate import check_choice, check_int, warn_ignored

POOLINGS = ("avg", "max")


@register_strategy("snapkv")
@dataclass
class SnapKV(EvictionStrategy):
    """Keep the observation window and the prefix tokens it votes for.

    Algorithm (per row and kv head):
      1. window = the last `window_size` prompt tokens (kept, clipped to the budget)
      2. vote[j] = sum over window queries of softmax(q k^T)[j], averaged over the kv head's query group
      3. smooth the votes with a `kernel_size` pooling along the sequence (keeps neighbours together)
      4. keep the window plus the top-voted prefix tokens, `keep` in all
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

    def needs(self) -> AttentionNeeds:
        return AttentionNeeds(window=self.window_size)

    def scores(self, layer: LayerKV) -> torch.Tensor:
        votes = layer.window_attention.sum(2)
        return pool_scores(per_kv_head(votes, layer.groups), self.kernel_size, self.pooling)

    def promised(self, layer: LayerKV) -> torch.Tensor:
        return last_tokens(layer, torch.clamp(layer.keep_count, max=self.window_size))

    def plan(self, layer: LayerKV) -> Plan:
        return Plan(keep=keep_top(self.scores(layer), layer, protect=self.promised(layer)))
