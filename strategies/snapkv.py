"""SnapKV (Li et al., 2024, arXiv 2404.14469): what the observation window attends to, pooled."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_mm.layer import AttentionNeeds, LayerKV, Plan
from kvpress_mm.registry import register_strategy
from kvpress_mm.selection import keep_top, last_tokens, per_kv_head, pool_scores
from kvpress_mm.strategy import EvictionStrategy


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
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"SnapKV: window_size must be an integer >= 1, got {self.window_size!r}")
        if isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int) or self.kernel_size < 1:
            raise ValueError(f"SnapKV: kernel_size must be an integer >= 1, got {self.kernel_size!r}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"SnapKV: pooling must be 'avg' or 'max', got {self.pooling!r}")

    def needs(self) -> AttentionNeeds:
        return AttentionNeeds(window=self.window_size)

    def scores(self, layer: LayerKV) -> torch.Tensor:
        votes = layer.window_attention.sum(2)
        return pool_scores(per_kv_head(votes, layer.groups), self.kernel_size, self.pooling)

    def promised(self, layer: LayerKV) -> torch.Tensor:
        return last_tokens(layer, torch.clamp(layer.keep_count, max=self.window_size))

    def plan(self, layer: LayerKV) -> Plan:
        return Plan(keep=keep_top(self.scores(layer), layer, protect=self.promised(layer)))
