"""MixKV (Liu et al., ICLR 2026, arXiv 2510.20707): mix importance with the diversity of the kept keys."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvpress_mm.layer import AttentionNeeds, LayerKV, Plan
from kvpress_mm.registry import get_strategy, list_strategies, register_strategy
from kvpress_mm.selection import top_per_head
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.validate import FieldTypeError, check_bool, check_choice, check_mapping, check_str, warn_ignored

WEIGHTINGS = ("redundancy", "equal")
EPS = 1e-8  # as released: guards the min-max and mean rescalings

# base fields MixKV never uses: it reads the base's budgets (its plan's counts), scores() and promised() only
_IGNORED_BASE_FIELDS = {
    "phase": "MixKV compresses at the end of prefill only",
    "compress_every": "MixKV compresses at the end of prefill only",
    "merge": "MixKV re-ranks the base's selection and merges nothing",
    "merge_scope": "MixKV re-ranks the base's selection and merges nothing",
    "text_prior": "MixKV ranks by the base's scores(), which text_prior does not change",
    "text_prior_mode": "MixKV ranks by the base's scores(), which text_prior does not change",
}


@register_strategy("mixkv")
@dataclass
class MixKV(EvictionStrategy):
    """The base strategy's budgets (per row and kv head, head-wise ones included: adakv, sparsemm), re-ranked.

    Algorithm (per row and kv head), over the candidates (real tokens the base does not promise to keep):
      1. importance: A = the base's scores (e.g. SnapKV's pooled window votes) plus, with `intrinsic`, the
         value norm ||v_j|| min-max normalised over the candidates and rescaled to A's mean (VNorm)
      2. diversity: D_j = -cos(k_j, mean of the head's normalised keys), min-max normalised, rescaled to A's mean
      3. redundancy of the head: r = the mean cosine similarity of its distinct key pairs
         ((n * |mean normalised key|^2 - 1) / (n - 1) over its n real tokens), clipped to [0, 1]
      4. score = r * D + (1 - r) * importance (weighting="redundancy"); weighting="equal": the plain mean of
         D, A and the value term (the release's non-head-wise "mixkv" mode)
      5. keep the base's promised tokens plus the best-scoring others, as many per head as the base keeps

    r is measured on the prompt itself (the release reads per-head averages from a file made offline).
    """

    base: str = "snapkv"
    base_fields: dict = field(default_factory=dict)
    intrinsic: bool = True
    weighting: str = "redundancy"

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_bool(owner, "intrinsic", self.intrinsic)
        check_choice(owner, "weighting", self.weighting, WEIGHTINGS)
        check_str(owner, "base", self.base, what="the name of a registered strategy that ranks tokens")
        if self.base == "mixkv":
            raise ValueError(f"{owner}: base must be another strategy, not mixkv itself")
        check_choice(owner, "base", self.base, [n for n in list_strategies() if n != "mixkv"])
        check_mapping(owner, "base_fields", self.base_fields)
        own = sorted(set(self.base_fields) & {"budget", "budget_tokens"})
        if own:
            raise ValueError(
                f"{owner}: base_fields must not set {', '.join(own)} (got {dict(self.base_fields)!r}); "
                "the base strategy takes MixKV's own budget and budget_tokens"
            )
        for name in sorted(set(self.base_fields) & set(_IGNORED_BASE_FIELDS)):
            warn_ignored(owner, f"base_fields[{name!r}]", self.base_fields[name], _IGNORED_BASE_FIELDS[name])
        try:
            self._base = get_strategy(
                self.base, budget=self.budget, budget_tokens=self.budget_tokens, **dict(self.base_fields)
            )
        except ValueError as err:  # an unknown or bad base field: say it is base_fields' (same type)
            kind = FieldTypeError if isinstance(err, TypeError) else ValueError
            raise kind(f"{owner}: base_fields must be valid fields of {self.base}: {err}") from None
        if _importance_of(self._base) is None:
            raise ValueError(f"{owner}: base strategy {self.base!r} has no scores(layer) to take importance from")

    # the base's budget shape
    @property
    def headwise_budgets(self) -> bool:
        return bool(self._base.headwise_budgets)

    @property
    def exact_budget(self) -> bool:
        return bool(self._base.exact_budget)

    def __call__(self, model: torch.nn.Module, layout: str | None = None):
        bind = getattr(self._base, "bind", None)  # sparsemm: find the model's head profile
        if callable(bind):
            bind(model)
        return super().__call__(model, layout)

    def needs(self) -> AttentionNeeds:
        return self._base.needs()

    def kept_counts(self, n_valid, layer_idx, num_layers):
        return self._base.kept_counts(n_valid, layer_idx, num_layers)

    def promised(self, layer: LayerKV) -> torch.Tensor | None:
        return self._base.promised(layer)

    def mixed_scores(self, layer: LayerKV, candidates: torch.Tensor) -> torch.Tensor:
        """float32 [batch, kv_heads, seq]: the mixed score of every position (meaningful on `candidates`,
        bool [batch, kv_heads or 1, seq])."""
        b, h, length = layer.batch, layer.kv_heads, layer.length
        cand = candidates.expand(b, h, length)
        importance = _importance_of(self._base)(layer).float().expand(b, h, length)
        a_mean = _masked_mean(importance, cand)
        valid = layer.valid[:, None, :].expand(b, h, length)
        unit = F.normalize(layer.keys.float(), dim=-1) * valid[..., None]
        n = valid.sum(-1, keepdim=True).float()  # [B, H, 1]
        center = unit.sum(2) / n.clamp(min=1)  # [B, H, D]: mean normalised key
        diversity = -torch.einsum("bhld,bhd->bhl", unit, center)
        diversity = _rescaled(diversity, cand, a_mean)
        terms = [diversity, importance]
        if self.intrinsic:
            terms.append(_rescaled(layer.values.float().norm(dim=-1), cand, a_mean))
        if self.weighting == "equal":
            return sum(terms) / len(terms)
        redundancy = ((n[..., 0] * center.pow(2).sum(-1) - 1) / (n[..., 0] - 1).clamp(min=1)).clamp(0.0, 1.0)
        r = redundancy[..., None]
        return r * diversity + (1 - r) * sum(terms[1:])

    def plan(self, layer: LayerKV) -> Plan:
        b, h, length = layer.batch, layer.kv_heads, layer.length
        counts = self._base.plan(layer).keep.expand(b, h, length).sum(-1)  # the base's budget of each head
        promised = self.promised(layer)
        promised = torch.zeros_like(layer.valid) if promised is None else promised & layer.valid
        candidates = (layer.valid & ~promised)[:, None, :]
        rank = self.mixed_scores(layer, candidates)
        rank = rank.masked_fill(promised[:, None, :], float("inf"))
        return Plan(keep=top_per_head(rank, counts, allowed=layer.valid[:, None, :]))


def _importance_of(strategy):
    """The scores(layer) a strategy ranks by (a wrapper such as adakv: its inner scorer's), or None."""
    for candidate in (strategy, getattr(strategy, "_scorer", None)):
        scores = getattr(candidate, "scores", None)
        if callable(scores):
            return scores
    return None


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H, 1] mean of x over mask (0 where the mask is empty)."""
    return (x * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)


def _rescaled(x: torch.Tensor, mask: torch.Tensor, target_mean: torch.Tensor) -> torch.Tensor:
    """x min-max normalised over mask, then scaled so that its mean over mask is target_mean (as released)."""
    low = x.masked_fill(~mask, float("inf")).amin(-1, keepdim=True)
    high = x.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
    empty = ~mask.any(-1, keepdim=True)
    low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    unit = (x - low) / (high - low + EPS)
    return unit * (target_mean / (_masked_mean(unit, mask) + EPS))
