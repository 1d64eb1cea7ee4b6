"""TOVA (Oren et al., 2024, arXiv 2401.06104): keep what the last token attends to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_mm.layer import AttentionNeeds, LayerKV, Plan
from kvpress_mm.registry import register_strategy
from kvpress_mm.selection import keep_top, last_tokens
from kvpress_mm.strategy import EvictionStrategy


@register_strategy("tova")
@dataclass
class TOVA(EvictionStrategy):
    """Token Omission Via Attention, applied once at the end of prefill.

    Algorithm (per row):
      1. score[j] = softmax attention of the last prompt token on key j, averaged over all heads
         (one decision per layer, shared by its heads, as in the paper)
      2. keep the last token and the top-scoring others, `keep` in all
    """

    def needs(self) -> AttentionNeeds:
        return AttentionNeeds(window=1)

    def scores(self, layer: LayerKV) -> torch.Tensor:
        return layer.window_attention[:, :, -1].mean(1, keepdim=True)

    def promised(self, layer: LayerKV) -> torch.Tensor:
        return last_tokens(layer, 1)

    def plan(self, layer: LayerKV) -> Plan:
        return Plan(keep=keep_top(self.scores(layer), layer, protect=self.promised(layer)))
