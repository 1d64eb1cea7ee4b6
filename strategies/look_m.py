"""LOOK-M (Wan et al., EMNLP 2024 Findings, arXiv 2406.18139): text-prior selection + KV merging.

Compresses once, at the end of prefill ("look once"). Differences from the released code, each a fix
documented in docs/look-m.md: the budget is strict by default (text_prior_mode="strict_budget"; the
release's keep-all-text behaviour is text_prior_mode="keep_all_text"); merges are per (row, kv head)
with the averaged scatter aligned, per-head weighted filters and normalised weights; any batch size,
head_dim, image size and grouped-query attention work; modality comes from each row's own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_mm.layer import AttentionNeeds, LayerKV, Plan
from kvpress_mm.merge import MERGE_MODES, MERGE_SCOPES, merge_evicted
from kvpress_mm.modality import Modality
from kvpress_mm.registry import register_preset, register_strategy
from kvpress_mm.selection import first_tokens, keep_top, last_tokens, per_kv_head, tiered
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.validate import check_bool, check_choice, check_fraction, check_int, warn_ignored

TEXT_PRIOR_MODES = ("strict_budget", "keep_all_text")
SCORES = ("sum", "mean")
RANKINGS = ("accumulated", "window")


@register_strategy("look_m")
@dataclass
class LookM(EvictionStrategy):
    """Algorithm (per row and kv head), with keep = the budget rule:

      1. score[j] = attention key j received from all prompt queries (H2O), averaged over the query
         group; score="mean" divides by the number of queries that could see j.
         ranking="window": from the last `window_size` prompt queries only (SnapKV's observation window)
      2. protect the first `sinks` tokens and the last floor(recent_share * keep) tokens
      3. text_prior: text tokens rank before image / video tokens, each tier by score
      4. keep the protected tokens plus the best-ranked others, keep in all
         (keep_all_text: additionally every text token, over the budget, as released)
      5. merge: fold each evicted token into the kept token with the most similar key
         (averaged / pivotal / weighted; merge_scope="same_modality" stays within a modality)

    Defaults are the paper's headline configuration (text_prior_pivot_merge).
    """

    recent_share: float = 0.5
    text_prior: bool = True
    text_prior_mode: str = "strict_budget"
    merge: str = "pivotal"
    merge_scope: str = "any"
    sinks: int = 4
    score: str = "sum"
    ranking: str = "accumulated"
    window_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_choice(owner, "merge", self.merge, MERGE_MODES)
        check_choice(owner, "merge_scope", self.merge_scope, MERGE_SCOPES)
        check_choice(owner, "text_prior_mode", self.text_prior_mode, TEXT_PRIOR_MODES)
        check_choice(owner, "score", self.score, SCORES)
        check_choice(owner, "ranking", self.ranking, RANKINGS)
        check_int(owner, "window_size", self.window_size, minimum=1)
        if self.ranking == "accumulated" and self.window_size != 32:
            warn_ignored(owner, "window_size", self.window_size, 'it applies with ranking="window" only')
        check_bool(owner, "text_prior", self.text_prior)
        check_int(owner, "sinks", self.sinks, minimum=0)
        check_fraction(owner, "recent_share", self.recent_share)
        if not self.text_prior and self.text_prior_mode != "strict_budget":
            warn_ignored(owner, "text_prior_mode", self.text_prior_mode, "it applies with text_prior=True only")
        if self.merge == "none" and self.merge_scope != "any":
            warn_ignored(owner, "merge_scope", self.merge_scope, 'merge="none" merges nothing')

    @property
    def exact_budget(self) -> bool:
        """False when every text token is kept on top of the budget (the release's behaviour)."""
        return not (self.text_prior and self.text_prior_mode == "keep_all_text")

    def needs(self) -> AttentionNeeds:
        if self.ranking == "window":
            return AttentionNeeds(window=self.window_size)
        return AttentionNeeds(accumulated=True)

    def promised(self, layer: LayerKV) -> torch.Tensor:
        sinks = torch.clamp(layer.keep_count, max=self.sinks)
        recent = torch.minimum(
            torch.floor(layer.keep_count.double() * self.recent_share).long(), layer.keep_count - sinks
        )
        return first_tokens(layer, sinks) | last_tokens(layer, recent)

    def scores(self, layer: LayerKV) -> torch.Tensor:
        if self.ranking == "window":
            if layer.window_attention is None:  # a subclass whose needs() does not ask for the window
                raise ValueError(
                    f"{type(self).__name__}: ranking='window' needs window attention, which its needs() does not "
                    "ask for; use ranking='accumulated'"
                )
            scores = per_kv_head(layer.window_attention.sum(2), layer.groups)
        else:
            scores = per_kv_head(layer.accumulated_attention, layer.groups)
        if self.score == "mean":
            # queries that can see key j: the real tokens from j on (causal), within the window if ranked by it
            seen_by = layer.n_valid[:, None] - layer.rank
            if self.ranking == "window":
                seen_by = torch.minimum(seen_by, layer.n_valid.clamp(max=self.window_size)[:, None])
            scores = scores / seen_by.clamp(min=1)[:, None, :]
        return scores

    def plan(self, layer: LayerKV) -> Plan:
        scores = self.scores(layer)
        text = layer.is_modality(Modality.TEXT)
        if self.text_prior:
            scores = tiered(scores, text)
        keep = keep_top(scores, layer, protect=self.promised(layer))
        if not self.exact_budget:
            keep = keep | text[:, None, :]
        if self.merge == "none":
            return Plan(keep=keep)
        labels = layer.modality if self.merge_scope == "same_modality" else None
        keys, values = merge_evicted(layer.keys, layer.values, keep, layer.valid, self.merge, labels)
        return Plan(keep=keep, keys=keys, values=values)


# The released code's --kv_mode names (origin = "full", h2o / snapkv = the baselines of the same names).
# Merge modes force the first 4 tokens, as released; selection-only modes do not.
_RELEASE_MODES = {
    "mean_h2o": dict(text_prior=False, merge="none", sinks=0, score="mean"),
    "avg_merge": dict(text_prior=False, merge="averaged"),
    "pivot_merge": dict(text_prior=False, merge="pivotal"),
    "weighted_merge": dict(text_prior=False, merge="weighted"),
    "text_prior_h2o": dict(text_prior=True, merge="none", sinks=0),
    "text_prior_avg_merge": dict(text_prior=True, merge="averaged"),
    "text_prior_pivot_merge": dict(text_prior=True, merge="pivotal"),
    "text_prior_weighted_merge": dict(text_prior=True, merge="weighted"),
}
for _name, _fields in _RELEASE_MODES.items():
    register_preset(_name, LookM, description=f"LOOK-M release mode {_name}", **_fields)
