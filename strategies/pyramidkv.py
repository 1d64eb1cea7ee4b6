"""PyramidKV (Cai et al., 2024, arXiv 2406.02069): lower layers keep more, upper layers less."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_mm.registry import register_strategy
from kvpress_mm.validate import check_int

from .snapkv import SnapKV


@register_strategy("pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    """SnapKV selection with per-layer budgets shaped like a pyramid, same total as a flat budget.

    Algorithm (per row): with avg = the budget rule and n layers,
      top = max(avg / beta, 1) tokens at the last layer, bottom = 2 * avg - top at the first (capped at the
      row's length, the slope shrinking to keep the total), linear in between; each layer then keeps
      the SnapKV window plus its top-voted tokens. Layer budgets sum to n * avg exactly.
    """

    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        check_int(type(self).__name__, "beta", self.beta, minimum=1)

    def layer_budgets(self, n_valid: torch.Tensor, num_layers: int) -> torch.Tensor:
        """[num_layers, batch] tokens kept per layer and row."""
        avg = super().kept_counts(n_valid, 0, num_layers).double()
        if num_layers == 1:
            return avg.long()[None]
        top = (avg / self.beta).clamp(min=1.0)  # every layer keeps at least one token
        bottom = 2 * avg - top
        over = (bottom - n_valid.double()).clamp(min=0)  # never plan more than the row has
        bottom, top = bottom - over, top + over
        steps = torch.arange(num_layers, dtype=torch.float64)[:, None] / (num_layers - 1)
        exact = bottom[None] - (bottom - top)[None] * steps
        budgets = exact.floor()
        # hand the rounding remainder to the layers with the largest fractional parts
        remainder = (avg * num_layers - budgets.sum(0)).round().long()
        order = (exact - budgets).argsort(dim=0, descending=True)
        bonus = (torch.arange(num_layers)[:, None] < remainder[None]).double()
        budgets.scatter_add_(0, order, bonus)
        return budgets.long().clamp(min=1).minimum(n_valid[None])

    def kept_counts(self, n_valid, layer_idx, num_layers):
        return self.layer_budgets(n_valid.cpu(), num_layers)[layer_idx].to(n_valid.device)
