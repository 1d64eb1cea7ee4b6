"""MadaKV (Li et al., ACL 2025, arXiv 2506.15724): modality-preference head budgets + layer compensation.

https://arxiv.org/abs/2506.15724 -- choices beyond the paper: docs/strategies-successors.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpress_mm.layer import AttentionNeeds, LayerKV, Plan
from kvpress_mm.modality import Modality
from kvpress_mm.registry import register_strategy
from kvpress_mm.selection import SpanSelection, allocate_layers, per_kv_head, proportional_counts, top_per_head
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.validate import check_choice, check_fraction, check_int

COMPENSATIONS = ("sequential", "proportional")


@register_strategy("madakv")
@dataclass
class MadaKV(SpanSelection, EvictionStrategy):
    """Algorithm (per row), with the layers' budgets allocated together at the end of prefill:

    1. psi_h(i) = sum over the proxy queries (the last window_size prompt tokens) of softmax(q k^T)[i],
       averaged over kv head h's query group; w_m^h = sum of psi_h over the keys of modality m (text, vision)
    2. demand (HCC sparsity): k_m^h = the fewest tokens of modality m whose psi_h reaches coverage x w_m^h;
       the layer's demand D_l = mean over heads of k_text^h + k_vision^h
    3. compensation (HCC), layer by layer with phi_1 = the uniform budget: layer l keeps its demand D_l,
       phi_{l+1} = phi_l - (D_l - phi_l) / (L - l) (what is left, spread over the layers left; the last
       layer keeps what remains, so the total is n_layers x uniform); compensation="proportional" instead
       gives layers budgets in proportion to D_l (no dependence on layer order)
    4. head budgets: the layer's keep x H slots go to its heads in proportion to their demands (>= 1 each)
    5. modality preference (MPA): head h keeps b_h w_v^h / (w_v^h + w_t^h) visual and the rest text tokens,
       each the top psi_h of its modality
    """

    budget_scope: ClassVar[str] = "model"
    headwise_budgets: ClassVar[bool] = True

    window_size: int = 32
    coverage: float = 0.9
    compensation: str = "sequential"

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_int(owner, "window_size", self.window_size, minimum=1)
        check_fraction(owner, "coverage", self.coverage, low_open=True)
        check_choice(owner, "compensation", self.compensation, COMPENSATIONS)
        self._check_spans()

    def needs(self) -> AttentionNeeds:
        return AttentionNeeds(window=self.window_size, queries="recent", accumulated=True)

    def preferences(self, layer: LayerKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(psi [B, Hkv, S], masks bool [B, 1, S, 2] text / vision, demand [B, Hkv, 2] per head and modality)."""
        psi = per_kv_head(layer.accumulated_attention, layer.groups)
        masks = torch.stack([layer.is_modality(Modality.TEXT), layer.is_vision], dim=-1)[:, None]  # [B, 1, S, 2]
        per_modality = torch.where(masks, psi[..., None], 0.0)  # [B, Hkv, S, 2]
        totals = per_modality.sum(2)  # w_m^h
        ranked = per_modality.sort(dim=2, descending=True).values.cumsum(2)
        # tokens before the cumulative mass reaches coverage x w, plus the one that reaches it
        short = ranked < (self.coverage * totals)[:, :, None, :] * (1 - 1e-6)
        demand = (short.sum(2) + 1).minimum(masks.sum(2))
        demand = torch.where(totals > 0, demand, 0)
        return psi, masks, demand

    def layer_summary(self, layer: LayerKV) -> torch.Tensor:
        """[batch] the layer's demand D_l (tokens per head)."""
        return self.preferences(layer)[2].sum(-1).double().mean(1)

    def allocate(self, summaries: list[torch.Tensor], n_valid: torch.Tensor, num_layers: int) -> torch.Tensor:
        demand = torch.stack([s.to(n_valid.device) for s in summaries]).double()  # [layers, B]
        uniform = self.kept_counts(n_valid, 0, num_layers)
        n_layers = demand.shape[0]
        if self.compensation == "proportional":
            return allocate_layers(demand, n_valid, uniform)
        low, high = torch.clamp(n_valid, max=1), n_valid
        left = uniform * n_layers
        counts = []
        for layer in range(n_layers):
            after = n_layers - layer - 1
            # keep the demand, as far as the layers after this one can still keep 1 .. all of their tokens
            lowest = (left - after * high).clamp(min=low)
            highest = (left - after * low).clamp(max=high)
            count = demand[layer].round().long().clamp(min=lowest).clamp(max=highest)
            if after == 0:
                count = left
            counts.append(count)
            left = left - count
        return torch.stack(counts)

    def plan(self, layer: LayerKV) -> Plan:
        psi, masks, demand = self.preferences(layer)
        n_valid = layer.n_valid[:, None].expand(-1, layer.kv_heads)
        heads = proportional_counts(
            demand.sum(-1).double(), layer.keep_count * layer.kv_heads, n_valid, torch.clamp(n_valid, max=1)
        )
        # MPA: the head's budget split by its modality preference w_v / (w_v + w_t), within each modality's size
        preference = torch.where(masks, psi[..., None], 0.0).sum(2)  # [B, Hkv, 2]
        split = proportional_counts(preference, heads, masks.sum(2).expand_as(preference), 0)
        psi = self.pool_spans(psi, layer)
        keep = top_per_head(psi, split[..., 0], masks[..., 0]) | top_per_head(psi, split[..., 1], masks[..., 1])
        return Plan(keep=keep)
