"""SparseMM (Wang et al., ICCV 2025, arXiv 2506.05344): most of the KV budget to the model's visual heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpress_mm.head_profiles import AUTO, HeadProfile, check_profile_field, find_profile, load_profile
from kvpress_mm.layer import LayerKV, Plan
from kvpress_mm.registry import register_strategy
from kvpress_mm.selection import top_per_head
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.validate import check_choice, check_fraction

from .snapkv import SnapKV

ALLOCATIONS = ("model", "layer")


@register_strategy("sparsemm")
@dataclass
class SparseMM(SnapKV):
    """Head-wise budgets from the model's head profile (visual scores, found offline), SnapKV within each head.

    Algorithm (per row), with k = the budget rule (tokens per kv head on average), w = min(k, window_size),
    m = floor((k - w) * uniform_share), and s[l, h] = kv head h of layer l's visual score (its query heads'
    scores summed), normalised to sum 1 over every head of the model (allocation="model", as released) or
    over each layer's heads (allocation="layer": every layer keeps k per head on average):
      1. every head keeps its local window (the last w tokens) and a uniform share of m tokens
      2. the remaining (k - w - m) tokens per head, pooled over all the heads, go to the heads in proportion
         to s: head (l, h) keeps w + m + s[l, h] * (k - w - m) * (number of heads) tokens
         (whole tokens by largest remainder, ties to the lower index; a head never keeps more than the row
         has: its excess goes to the other heads in proportion to s)
      3. within each head: the window plus the tokens the window votes for (SnapKV: summed window attention,
         pooled with kernel_size), as many as the head's budget

    profile: "auto" (the shipped profile of the model's identity, mini_llava's) or the path of a head profile
    file (`kvpress-mm profile-heads`); a model without one is a ValueError naming that command. Layers keep
    different totals with allocation="model"; each layer's cache holds its largest head, the other heads'
    spare slots masked (docs/strategies-heads.md measures what that costs).
    """

    headwise_budgets: ClassVar[bool] = True

    profile: str = AUTO
    uniform_share: float = 0.1
    allocation: str = "model"

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_profile_field(owner, self.profile)
        check_fraction(owner, "uniform_share", self.uniform_share)
        check_choice(owner, "allocation", self.allocation, ALLOCATIONS)

    # ------------------------------------------------------------------ the profile of the model
    def __call__(self, model: torch.nn.Module, layout: str | None = None):
        self.bind(model)
        return super().__call__(model, layout)

    def bind(self, model: torch.nn.Module) -> HeadProfile | None:
        """Find (and check) the head profile for `model`; the context manager does this on entry.
        Nothing to find when nothing is ever evicted (budget=1.0 without budget_tokens)."""
        if self.budget >= 1.0 and self.budget_tokens is None:
            self.__dict__["_bound"] = None
            return None
        from kvpress_mm.adapters import adapter_for

        profile = find_profile(model, self.profile, owner=type(self).__name__)
        sliding = adapter_for(model).sliding_layers(model)  # left uncompressed: they take no share
        self.__dict__["_bound"] = (self.profile, profile, frozenset(sliding))
        return profile

    def _profile(self, num_layers: int, kv_heads: int | None = None, query_heads: int | None = None):
        """(profile, uncompressed layers) for this call: the bound model's, else the `profile` file's."""
        bound = self.__dict__.get("_bound")
        if bound is not None and bound[0] == self.profile:
            profile, sliding = bound[1], bound[2]
        elif self.profile != AUTO:
            profile, sliding = load_profile(self.profile), frozenset()
        else:
            raise ValueError(
                f"{type(self).__name__}: profile={AUTO!r} finds the head profile of the model it compresses, "
                "inside `with strategy(model):`; to plan a layer outside a model, set profile=<head profile file> "
                "(made by `kvpress-mm profile-heads`)"
            )
        m = profile.model
        heads = (m.num_kv_heads, m.num_query_heads) if kv_heads is None else (kv_heads, query_heads)
        profile.check_dims(num_layers, *heads)
        return profile, sliding

    # ------------------------------------------------------------------ budgets
    def _flat(self, n_valid: torch.Tensor) -> torch.Tensor:
        return EvictionStrategy.kept_counts(self, n_valid, 0, 1)

    def kept_counts(self, n_valid, layer_idx, num_layers):
        flat = self._flat(n_valid)
        if self.allocation == "layer" or bool((flat >= n_valid).all()):
            return flat
        return self.layer_budgets(n_valid, num_layers)[layer_idx].to(n_valid.device)

    def layer_budgets(self, n_valid: torch.Tensor, num_layers: int) -> torch.Tensor:
        """long [num_layers, batch]: tokens per kv head, on average, each layer keeps (allocation="model")."""
        profile, sliding = self._profile(num_layers)
        n_valid = n_valid.cpu()
        fields = (self.budget, self.budget_tokens, self.window_size, self.uniform_share)
        key = (tuple(n_valid.tolist()), num_layers, id(profile), sliding, fields)
        cached = self.__dict__.get("_layer_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        k = self._flat(n_valid)
        w, m = self._window_and_uniform(k)
        managed = [i for i in range(num_layers) if i not in sliding]
        out = k[None].repeat(num_layers, 1)
        if managed:
            shares = profile.kv_scores()[managed].sum(-1)
            out[managed] = apportion(k * len(managed), shares, w + m, n_valid).T
        self.__dict__["_layer_cache"] = (key, out)
        return out

    def _window_and_uniform(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.clamp(k, max=self.window_size)
        return w, torch.floor((k - w).double() * self.uniform_share).long()

    def head_budgets(self, layer: LayerKV) -> torch.Tensor:
        """long [batch, kv_heads]: tokens each head of this layer keeps; they sum to keep_count * kv_heads."""
        profile, _ = self._profile(layer.num_layers, layer.kv_heads, layer.num_query_heads)
        keep, n_valid = torch.stack([layer.keep_count, layer.n_valid]).cpu()  # one host read
        w, m = self._window_and_uniform(self._flat(n_valid))
        weights = profile.kv_scores()[layer.layer_idx]
        return apportion(keep * layer.kv_heads, weights, w + m, n_valid).to(layer.keys.device)

    def plan(self, layer: LayerKV) -> Plan:
        counts = self.head_budgets(layer)
        rank = self.scores(layer).float().expand(layer.batch, layer.kv_heads, layer.length)
        rank = rank.masked_fill(self.promised(layer)[:, None, :], float("inf"))
        return Plan(keep=top_per_head(rank, counts, allowed=layer.valid[:, None, :]))


def apportion(total: torch.Tensor, weights: torch.Tensor, floor: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """long [B, N] whole shares of total[b] over N items: each gets floor[b] plus a part of the rest in proportion
    to weights [N] (equal parts when the weights are all 0), never more than cap[b]; an item's excess over the
    cap goes to the others (water filling); whole numbers by largest remainder, ties to the lower index.
    Needs N * floor <= total <= N * cap."""
    b, n = total.shape[0], weights.shape[0]
    total, floor, cap = total.double()[:, None], floor.double()[:, None], cap.double()[:, None]
    w = weights.double().clamp(min=0)[None].expand(b, n)
    free = torch.ones((b, n), dtype=torch.bool)
    x = floor.expand(b, n)
    for _ in range(n):
        pool = total - torch.where(free, floor, cap).sum(-1, keepdim=True)
        w_free = torch.where(free, w, 0.0)
        w_sum = w_free.sum(-1, keepdim=True)
        even = free.double() / free.sum(-1, keepdim=True).clamp(min=1)
        share = torch.where(w_sum > 0, w_free / w_sum.clamp(min=1e-300), even)
        x = torch.where(free, floor + share * pool, cap)
        over = free & (x > cap)
        if not bool(over.any()):
            break
        free = free & ~over
    # snap to a 2^-24 grid: float rounding would otherwise split exact ties between remainders (4/7 vs 4/7)
    # and put an exact whole share a hair below itself; the grid is far above float64's error at these sizes
    x = torch.minimum((x * 2**24).round() / 2**24, cap)
    whole = x.floor()
    missing = (total[:, 0] - whole.sum(-1)).round().long()
    remainder = torch.where(whole < cap, x - whole, -1.0)
    order = remainder.argsort(dim=-1, descending=True, stable=True)
    bonus = (torch.arange(n)[None, :] < missing[:, None]).double()
    return whole.scatter_add(-1, order, bonus).long()
