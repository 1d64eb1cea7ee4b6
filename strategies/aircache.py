"""AirCache (Huang et al., ICCV 2025, arXiv 2503.23956): elite window, strength + skewness layer budgets.

https://arxiv.org/abs/2503.23956 -- choices beyond the paper: docs/strategies-successors.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpress_mm.layer import AttentionNeeds, LayerKV, Plan
from kvpress_mm.modality import Modality
from kvpress_mm.registry import register_strategy
from kvpress_mm.selection import SpanSelection, allocate_layers, keep_top, per_kv_head, tiered
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.validate import check_bool, check_fraction, check_int


@register_strategy("aircache")
@dataclass
class AirCache(SpanSelection, EvictionStrategy):
    """Algorithm (per row), with the layers' budgets allocated together at the end of prefill:

    1. elite window (per layer): Att = softmax over the text keys of the last text query, averaged over heads;
       elite = text queries j with Att[j] >= relevancy_threshold x max Att (at most window_size, the strongest)
    2. A = softmax of the elite queries over the visual keys and the elite text keys (their probabilities
       renormalised over those keys); I_v = A averaged over the elite queries, on the visual keys
    3. strength s_t = sum of I_v; skewness s_k = N / ((N - 1)(N - 2)) sum ((I_v - mean) / std)^3 (N visual keys,
       I_v averaged over heads; s_k < 0 counts as 0)
    4. layer budget ~ (s_t / sum_l s_t + s_k / sum_l s_k) / 2, the total = n_layers x the uniform budget
       (uniform_share mixes in equal budgets first)
    5. each (row, kv head) keeps its layer's budget: text first (text_first; ranked by the elite queries'
       attention), then visual tokens by I_v (averaged over the kv head's query group)
    """

    budget_scope: ClassVar[str] = "model"

    relevancy_threshold: float = 0.9
    window_size: int = 32
    text_first: bool = True
    uniform_share: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_fraction(owner, "relevancy_threshold", self.relevancy_threshold)
        check_int(owner, "window_size", self.window_size, minimum=1)
        check_bool(owner, "text_first", self.text_first)
        check_fraction(owner, "uniform_share", self.uniform_share)
        self._check_spans()

    def needs(self) -> AttentionNeeds:
        return AttentionNeeds(window=self.window_size, queries="elite", elite_threshold=self.relevancy_threshold)

    def importance(self, layer: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        """(I [B, H, S]: elite attention renormalised over the visual + elite text keys, raw [B, H, S]: plain
        elite attention), both averaged over the elite queries."""
        probs = layer.window_attention
        rows = layer.window_valid.to(probs.dtype)
        elite_keys = torch.zeros_like(layer.valid).scatter_(
            1, layer.window_positions.clamp(min=0), layer.window_positions >= 0
        )
        subset = (layer.is_vision | elite_keys).to(probs.dtype)
        mass = (probs * subset[:, None, None, :]).sum(-1, keepdim=True)
        restricted = probs * subset[:, None, None, :] / mass.clamp(min=1e-30)
        n_rows = rows.sum(-1).clamp(min=1)[:, None, None]
        weights = rows[:, None, :, None]
        return (restricted * weights).sum(2) / n_rows, (probs * weights).sum(2) / n_rows

    def layer_summary(self, layer: LayerKV) -> torch.Tensor:
        """[batch, 2] strength and skewness of the visual importance (0 for a row without visual tokens)."""
        importance = self.importance(layer)[0].mean(1)  # [B, S]
        vision = layer.is_vision.to(importance.dtype)
        n = vision.sum(-1)
        strength = (importance * vision).sum(-1)
        mean = strength / n.clamp(min=1)
        centred = (importance - mean[:, None]) * vision
        std = ((centred**2).sum(-1) / (n - 1).clamp(min=1)).sqrt()
        cubed = ((centred / std.clamp(min=1e-30)[:, None]) ** 3 * vision).sum(-1)
        skew = torch.where((n > 2) & (std > 0), n / ((n - 1) * (n - 2)).clamp(min=1) * cubed, 0.0)
        return torch.stack([strength, skew], dim=-1)

    def allocate(self, summaries: list[torch.Tensor], n_valid: torch.Tensor, num_layers: int) -> torch.Tensor:
        stats = torch.stack([s.to(n_valid.device) for s in summaries]).double()  # [layers, B, 2]
        stats[..., 1].clamp_(min=0)
        total = stats.sum(0, keepdim=True)
        normalised = torch.where(total > 0, stats / total.clamp(min=1e-300), 1.0 / len(summaries))
        weights = normalised.mean(-1)
        return allocate_layers(weights, n_valid, self.kept_counts(n_valid, 0, num_layers), self.uniform_share)

    def scores(self, layer: LayerKV) -> torch.Tensor:
        restricted, raw = (per_kv_head(x, layer.groups) for x in self.importance(layer))
        text = layer.is_modality(Modality.TEXT)
        if not self.text_first:
            return self.pool_spans(raw, layer)
        scores = torch.where(layer.is_vision[:, None, :], restricted, raw)
        return tiered(self.pool_spans(scores, layer), text)

    def plan(self, layer: LayerKV) -> Plan:
        return Plan(keep=keep_top(self.scores(layer), layer))
