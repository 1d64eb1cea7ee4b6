"""AdaKV (Feng et al., 2024, arXiv 2407.11550): spread a layer's budget unevenly over its kv heads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvpress_mm.layer import AttentionNeeds, LayerKV, Plan
from kvpress_mm.registry import get_strategy, list_strategies, register_strategy
from kvpress_mm.selection import as_row_counts
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.validate import FieldTypeError, check_choice, check_fraction, check_mapping, check_str, warn_ignored

# inner strategy fields AdaKV never uses: it reads the inner strategy's scores() and promised() only
_IGNORED_INNER_FIELDS = {
    "phase": "AdaKV compresses at the end of prefill only",
    "compress_every": "AdaKV compresses at the end of prefill only",
    "merge": "AdaKV selects with the inner strategy's scores and merges nothing",
    "merge_scope": "AdaKV selects with the inner strategy's scores and merges nothing",
    "text_prior": "AdaKV ranks by the inner strategy's scores(), which text_prior does not change",
    "text_prior_mode": "AdaKV ranks by the inner strategy's scores(), which text_prior does not change",
}


@register_strategy("adakv")
@dataclass
class AdaKV(EvictionStrategy):
    """Head-wise adaptive budgets around any scoring strategy (`inner`, e.g. snapkv, h2o, tova, knorm).

    Algorithm (per row): with keep tokens per head on average and H kv heads,
      1. every head keeps its promised tokens and its floor(alpha_safeguard * keep) best tokens
      2. the rest of the layer's keep * H slots go to the best remaining (head, token) pairs overall
    Heads end up with different counts: by default (layout="auto") the framework stores only what each head
    keeps (a flat layer with its own attention); with layout="padded" the cache shrinks to the largest head
    and the spare slots are masked per head in attention (memory is really saved, unlike key masking).
    Uses the inner strategy's scores() and promised(), not its plan (so no merging).
    """

    headwise_budgets: ClassVar[bool] = True

    inner: str = "snapkv"
    inner_fields: dict = field(default_factory=dict)
    alpha_safeguard: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_fraction(owner, "alpha_safeguard", self.alpha_safeguard)
        check_str(owner, "inner", self.inner, what="the name of a registered scoring strategy")
        if self.inner == "adakv":
            raise ValueError(f"{owner}: inner must be a scoring strategy, not adakv itself")
        check_choice(owner, "inner", self.inner, [n for n in list_strategies() if n != "adakv"])
        check_mapping(owner, "inner_fields", self.inner_fields)
        own = sorted(set(self.inner_fields) & {"budget", "budget_tokens"})
        if own:
            raise ValueError(
                f"{owner}: inner_fields must not set {', '.join(own)} (got {dict(self.inner_fields)!r}); "
                "the inner strategy takes AdaKV's own budget and budget_tokens"
            )
        for name in sorted(set(self.inner_fields) & set(_IGNORED_INNER_FIELDS)):
            warn_ignored(owner, f"inner_fields[{name!r}]", self.inner_fields[name], _IGNORED_INNER_FIELDS[name])
        # rebuilt on every validation, so that a later assignment (strategy.budget = 0.3) reaches it too
        try:
            self._scorer = get_strategy(
                self.inner, budget=self.budget, budget_tokens=self.budget_tokens, **dict(self.inner_fields)
            )
        except ValueError as err:  # an unknown or bad inner field: say it is inner_fields' (same type)
            kind = FieldTypeError if isinstance(err, TypeError) else ValueError
            raise kind(f"{owner}: inner_fields must be valid fields of {self.inner}: {err}") from None
        if not callable(getattr(self._scorer, "scores", None)):
            raise ValueError(f"{owner}: inner strategy {self.inner!r} has no scores(layer) to allocate budgets by")

    def needs(self) -> AttentionNeeds:
        return self._scorer.needs()

    def kept_counts(self, n_valid, layer_idx, num_layers):
        return self._scorer.kept_counts(n_valid, layer_idx, num_layers)

    def promised(self, layer: LayerKV) -> torch.Tensor | None:
        return self._scorer.promised(layer)

    def plan(self, layer: LayerKV) -> Plan:
        scores = self._scorer.scores(layer).float().expand(layer.batch, layer.kv_heads, layer.length)
        rank = scores.masked_fill(~layer.valid[:, None, :], float("-inf"))
        promised = self.promised(layer)
        if promised is not None:
            rank = rank.masked_fill(promised[:, None, :] & layer.valid[:, None, :], float("inf"))
        keep = layer.keep_count
        floor = torch.floor(keep.double() * self.alpha_safeguard).long()
        if promised is not None:
            floor = torch.maximum(floor, promised.sum(-1))
        chosen = _top_per_row(rank, as_row_counts(floor, layer)[:, None].expand(-1, layer.kv_heads))
        # the remaining slots of the layer, competed for by every (head, token) pair
        rest = (keep * layer.kv_heads - chosen.sum((1, 2))).clamp(min=0)
        flat = rank.masked_fill(chosen, float("-inf")).flatten(1)
        extra = _top_per_row(flat[:, None, :], rest[:, None])[:, 0].view_as(chosen)
        return Plan(keep=chosen | extra)


def _top_per_row(rank: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool mask of the counts[b, h] best finite-or-inf entries of rank[b, h] (never -inf)."""
    k_max = int(counts.max()) if counts.numel() else 0
    out = torch.zeros(rank.shape, dtype=torch.bool, device=rank.device)
    if k_max == 0:
        return out
    top = rank.topk(min(k_max, rank.shape[-1]), dim=-1)
    take = torch.arange(top.indices.shape[-1], device=rank.device) < counts[..., None]
    take &= top.values > float("-inf")
    return out.scatter_(-1, top.indices, take)
