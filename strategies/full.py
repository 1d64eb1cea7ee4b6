"""full: keep every token (the reference every other strategy is compared against)."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress_mm.layer import LayerKV, Plan
from kvpress_mm.registry import register_strategy
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.validate import warn_ignored


@register_strategy("full")
@dataclass
class Full(EvictionStrategy):
    """No compression, whatever the budget says (budget and budget_tokens are ignored, with a warning)."""

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        if self.budget_tokens is not None:
            warn_ignored(owner, "budget_tokens", self.budget_tokens, "full keeps every token")
        elif float(self.budget) != 1.0:
            warn_ignored(owner, "budget", self.budget, "full keeps every token")

    def kept_counts(self, n_valid, layer_idx, num_layers):
        return n_valid

    def plan(self, layer: LayerKV) -> Plan:
        return Plan(keep=layer.valid[:, None, :])
