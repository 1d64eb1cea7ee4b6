"""H2O (Zhang et al., 2023, arXiv 2306.14048): heavy hitters by accumulated attention + recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_mm.layer import AttentionNeeds, LayerKV, Plan
from kvpress_mm.registry import register_strategy
from kvpress_mm.selection import last_tokens, per_kv_head
from kvpress_mm.strategy import DecodePhaseMixin, EvictionStrategy
from kvpress_mm.validate import check_fraction

from .snapkv import keep_best, prompt_memo


@register_strategy("h2o")
@dataclass
class H2O(DecodePhaseMixin, EvictionStrategy):
    """Keep the recent window plus the keys that received the most attention from all prompt queries.

    Algorithm (per row and kv head):
      1. score[j] = sum over prompt queries i >= j of softmax(q_i k^T)[j], averaged over the kv head's query group
      2. recent window = the last floor(recent_share * keep) tokens
      3. keep the window plus the top-scoring other tokens, `keep` in all
    """

    recent_share: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        self._check_phase()
        check_fraction(type(self).__name__, "recent_share", self.recent_share)

    def needs(self) -> AttentionNeeds:
        return AttentionNeeds(accumulated=True)

    def scores(self, layer: LayerKV) -> torch.Tensor:
        return per_kv_head(layer.accumulated_attention, layer.groups)

    def promised(self, layer: LayerKV) -> torch.Tensor:
        return last_tokens(layer, torch.floor(layer.keep_count.double() * self.recent_share).long())

    def plan(self, layer: LayerKV) -> Plan:
        memo = prompt_memo(self, layer)
        recent = memo.get(("recent", self.recent_share))
        if recent is None:  # the recent window depends on the prompt only
            recent = memo[("recent", self.recent_share)] = self.promised(layer)
        return Plan(keep=keep_best(self.scores(layer), layer, protect=recent, memo=memo))
