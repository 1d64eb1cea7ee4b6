"""full: keep every token (the reference every other strategy is compared against)."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress_mm.layer import LayerKV, Plan
from kvpress_mm.registry import register_strategy
from kvpress_mm.strategy import EvictionStrategy


@register_strategy("full")
@dataclass
class Full(EvictionStrategy):
    """No compression, whatever the budget says (budget is ignored)."""

    def kept_counts(self, n_valid, layer_idx, num_layers):
        return n_valid

    def plan(self, layer: LayerKV) -> Plan:
        return Plan(keep=layer.valid[:, None, :])
