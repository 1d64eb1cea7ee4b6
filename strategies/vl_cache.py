"""VL-Cache (Tu et al., ICLR 2025, arXiv 2410.23317): post-vision attention scores, sparsity-aware layer budgets.

https://arxiv.org/abs/2410.23317 -- choices beyond the paper: docs/strategies-successors.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpress_mm.layer import AttentionNeeds, LayerKV, Plan
from kvpress_mm.registry import register_strategy
from kvpress_mm.selection import SpanSelection, allocate_layers, keep_top, per_kv_head
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.validate import check_fraction


@register_strategy("vl_cache")
@dataclass
class VLCache(SpanSelection, EvictionStrategy):
    """Algorithm (per row), with the layers' budgets allocated together at the end of prefill:

    1. post-vision queries = the text queries after the row's last image / video token (no vision: all text)
    2. per layer: A = softmax attention of the post-vision queries over every key they see;
       ThresholdFilter: entries below sparsity_threshold x their row's maximum are zeroed;
       sparsity gamma_l = zeroed share of the visible entries (averaged over heads)
    3. layer budgets proportional to the density 1 - gamma_l, the total = n_layers x the uniform budget
       (uniform_share mixes in equal budgets first; each layer keeps 1 .. all of the row's tokens)
    4. score[j] = sum over post-vision queries of A[., j] (accumulated post-vision attention), averaged over
       the kv head's query group; each (row, kv head) keeps its layer's budget of top-scoring tokens
    """

    budget_scope: ClassVar[str] = "model"

    sparsity_threshold: float = 0.01
    uniform_share: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_fraction(owner, "sparsity_threshold", self.sparsity_threshold)
        check_fraction(owner, "uniform_share", self.uniform_share)
        self._check_spans()

    def needs(self) -> AttentionNeeds:
        return AttentionNeeds(accumulated=True, queries="post_vision", sparsity=self.sparsity_threshold)

    def layer_summary(self, layer: LayerKV) -> torch.Tensor:
        """[batch] the layer's density 1 - gamma_l (1 where no sparsity was measured)."""
        if layer.sparsity is None:
            return torch.ones(layer.batch, device=layer.keys.device)
        return 1.0 - layer.sparsity.mean(1)

    def allocate(self, summaries: list[torch.Tensor], n_valid: torch.Tensor, num_layers: int) -> torch.Tensor:
        density = torch.stack([s.to(n_valid.device) for s in summaries])
        uniform = self.kept_counts(n_valid, 0, num_layers)
        return allocate_layers(density, n_valid, uniform, self.uniform_share)

    def scores(self, layer: LayerKV) -> torch.Tensor:
        return self.pool_spans(per_kv_head(layer.accumulated_attention, layer.groups), layer)

    def plan(self, layer: LayerKV) -> Plan:
        return Plan(keep=keep_top(self.scores(layer), layer))
