"""MEDA (Wan et al., NAACL 2025, arXiv 2502.17599): cross-modal entropy layer budgets + KV merging.

https://arxiv.org/abs/2502.17599 -- choices beyond the paper: docs/strategies-successors.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpress_mm.layer import AttentionNeeds, LayerKV
from kvpress_mm.registry import register_strategy
from kvpress_mm.selection import SpanSelection, allocate_layers
from kvpress_mm.validate import check_choice, check_fraction

from .look_m import LookM

ENTROPIES = ("cross_modal", "all")


@register_strategy("meda")
@dataclass
class MEDA(SpanSelection, LookM):
    """Algorithm (per row), with the layers' budgets allocated together at the end of prefill:

    1. per layer: A_TV = attention of the text queries restricted to the visual keys (renormalised),
       A_VT = attention of the visual queries restricted to the text keys; per query its entropy
       E_cm = mean over text queries of H(A_TV) + mean over visual queries of H(A_VT), averaged over heads
       (entropy="all": the mean entropy of every query over every key, as the released code computes)
    2. w_l = softmax over layers of E_cm; layer budgets ~ w_l, the total = n_layers x the uniform budget
       (uniform_share mixes in equal budgets first; a row without visual tokens gets uniform budgets)
    3. selection (LOOK-M's): score[j] = accumulated attention from all prompt queries; protect the last
       floor(recent_share * keep) tokens (and `sinks` first ones); text ranks before vision (text_prior)
    4. merge: every evicted token is averaged into the kept token with the most similar key (merge, merge_scope)
    """

    budget_scope: ClassVar[str] = "model"

    merge: str = "averaged"
    sinks: int = 0
    entropy: str = "cross_modal"
    uniform_share: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_choice(owner, "entropy", self.entropy, ENTROPIES)
        check_fraction(owner, "uniform_share", self.uniform_share)
        self._check_spans()

    def needs(self) -> AttentionNeeds:
        window = self.ranking == "window"  # LOOK-M's ranking by the observation window instead of every query
        return AttentionNeeds(
            window=self.window_size if window else 0,
            accumulated=not window,
            cross_modal="all" if self.entropy == "all" else "between",
        )

    def layer_summary(self, layer: LayerKV) -> torch.Tensor:
        """[batch] the layer's entropy E_cm (0 without the cross-modal tables)."""
        tables = layer.cross_modal
        if tables is None:
            return torch.zeros(layer.batch, device=layer.keys.device)
        if self.entropy == "all":
            return tables.mean_entropy("any", "any").mean(1)
        return (tables.mean_entropy("text", "vision") + tables.mean_entropy("vision", "text")).mean(1)

    def allocate(self, summaries: list[torch.Tensor], n_valid: torch.Tensor, num_layers: int) -> torch.Tensor:
        entropy = torch.stack([s.to(n_valid.device) for s in summaries]).double()
        weights = torch.softmax(entropy, dim=0)
        return allocate_layers(weights, n_valid, self.kept_counts(n_valid, 0, num_layers), self.uniform_share)

    def scores(self, layer: LayerKV) -> torch.Tensor:
        return self.pool_spans(super().scores(layer), layer)
