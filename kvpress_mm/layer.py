"""What a strategy sees (LayerKV), what it may ask for (AttentionNeeds) and what it returns (Plan)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .modality import Modality
from .validate import check_choice, check_fraction, check_int

# which prompt queries the statistics come from (AttentionNeeds.queries)
QUERY_SETS = ("last", "recent", "post_vision", "text", "elite")
# groups of the cross-modal tables (CrossModal): a query's or key's modality, vision = image or video
CROSS_GROUPS = ("text", "vision", "any")
# which cross-modal tables the statistics compute (AttentionNeeds.cross_modal)
CROSS_MODAL = ("none", "between", "all")
# the key modalities of mass_by_modality's last dimension
KEY_MODALITIES = (Modality.TEXT, Modality.IMAGE, Modality.VIDEO)


@dataclass(frozen=True)
class AttentionNeeds:
    """Attention statistics a strategy needs, computed by the framework during a prompt's forward.

    window: softmax probabilities of up to `window` queries of the query set over all keys (SnapKV, TOVA).
    accumulated: per-key sum of probabilities over every query of the set (H2O, LOOK-M).
    queries: the query set (a row's real queries only, never padding):
        "last"         window: the last `window` prompt positions (as always); sums: every real query
        "recent"       the last `window` prompt positions (the real ones) as the set: sums, sparsity and tables
                       over them (SnapKV-style votes, MadaKV's proxy tokens); no window rows are returned
        "post_vision"  the real text queries after each row's last image / video token (VL-Cache);
                       a row without vision tokens: all its real text queries
        "text"         every real text query
        "elite"        AirCache's elite window, chosen per layer: the text queries j whose attention from the
                       row's last text query, a softmax over the text keys averaged over heads, is at least
                       elite_threshold x its largest value; at most `window` of them, the strongest kept
        For sets other than "last", window attention holds the set's last `window` queries per row (elite:
        its strongest `window`), rows left-padded with zero rows (LayerKV.window_positions says which).
    sparsity: > 0 asks for LayerKV.sparsity, the share of (query, visible key) entries of the set's queries
        whose probability is below sparsity x that query's largest one (VL-Cache's ThresholdFilter, p = 1%).
    cross_modal: asks for LayerKV.cross_modal, per-head tables of attention mass and entropy between the
        modalities of the set's queries and of the keys (MEDA's cross-modal entropy): "all"; "between" when the
        strategy reads only the text <-> vision entries: a layer whose keys are all of one modality has those at
        zero, so its pass is skipped (every entry zero) and the fused path can serve the sums; "none" (default).
    elite_threshold: the relevancy threshold alpha of queries="elite".

    accumulated, sparsity and cross_modal reduce over the same queries: the set ("last": every real query).
    """

    window: int = 0
    accumulated: bool = False
    queries: str = "last"
    sparsity: float = 0.0
    cross_modal: str = "none"
    elite_threshold: float = 0.9

    def __post_init__(self):
        owner = type(self).__name__
        check_int(owner, "window", self.window, minimum=0)
        check_choice(owner, "queries", self.queries, QUERY_SETS)
        check_fraction(owner, "sparsity", self.sparsity, hint="a threshold")
        check_fraction(owner, "elite_threshold", self.elite_threshold)
        check_choice(owner, "cross_modal", self.cross_modal, CROSS_MODAL)
        if self.queries in ("elite", "recent") and self.window == 0:
            raise ValueError(f'queries="{self.queries}" is sized by window: give window >= 1')

    @property
    def any(self) -> bool:
        return self.window > 0 or self.reduces

    @property
    def rows(self) -> bool:
        """Whether window probabilities are returned (not for the "recent" set, which only sizes by window)."""
        return self.window > 0 and self.queries != "recent"

    @property
    def reduces(self) -> bool:
        """Whether a pass over the set's queries is needed (sums, sparsity or cross-modal tables)."""
        return self.accumulated or self.sparsity > 0 or self.tables

    @property
    def tables(self) -> bool:
        """Whether cross-modal tables were asked for."""
        return self.cross_modal != "none"

    @property
    def key_modality(self) -> bool:
        """Whether the statistics need the modality of every key (the compressed past's too)."""
        return self.tables or self.queries == "elite"


@dataclass
class CrossModal:
    """Attention between modalities, per row and query head, over the set's queries and every visible key.

    Indexed [batch, heads, query group, key group] with the groups of CROSS_GROUPS (text, vision, any);
    a query's restricted distribution over a key group is its probabilities on that group's keys, renormalised.
    mass:    summed probability the group's queries give the group's keys.
    entropy: summed entropy (nats) of the queries' restricted distributions; queries that see no key of the
             group are left out (a text query before the first image has no distribution over image keys).
    queries: [batch, query group, key group] how many queries the entropy sums cover.
    """

    mass: torch.Tensor
    entropy: torch.Tensor
    queries: torch.Tensor

    def mean_entropy(self, query_group: str, key_group: str) -> torch.Tensor:
        """[batch, heads] average restricted entropy of the queries of one group over one key group (0: none)."""
        q, k = CROSS_GROUPS.index(query_group), CROSS_GROUPS.index(key_group)
        return self.entropy[:, :, q, k] / self.queries[:, None, q, k].clamp(min=1)


@dataclass
class LayerKV:
    """One decoder layer's prompt cache, as a strategy sees it.

    keys / values: [batch, kv_heads, seq, head_dim], after RoPE, on the layer's device.
    modality: [batch, seq] int8 Modality codes; PAD marks left padding.
    keep_count: [batch] tokens this layer keeps per row (the budget rule or the cross-layer allocation).
    window_attention: [batch, heads, Q, seq] float32 or None; rows of no query (padding, a set with fewer
        than Q queries) are all zero.
    window_positions: [batch, Q] long, the position in seq of each window row's query, -1 for a zero row
        (None: the rows are the last Q positions, as a hand-made LayerKV may have them).
    accumulated_attention: [batch, heads, seq] float32 or None (sum over the query set).
    sparsity: [batch, heads] float32 or None (AttentionNeeds.sparsity).
    cross_modal: CrossModal or None.
    token_ids: [batch, seq] long input ids of the prompt, or None (a prompt given as embeddings).
    replay_attention: [batch, heads, seq] float32 or None: for a strategy that declares a replay
        (`replay_rounds`, see kvpress_mm/replay.py), the largest probability each key received from the replay's
        queries, per query head.
    On a later prompt (compress="every_prompt") seq is the new tokens; the statistics' softmax saw the past.
    """

    layer_idx: int
    num_layers: int
    keys: torch.Tensor
    values: torch.Tensor
    modality: torch.Tensor
    keep_count: torch.Tensor
    num_query_heads: int
    window_attention: torch.Tensor | None = None
    accumulated_attention: torch.Tensor | None = None
    window_positions: torch.Tensor | None = None
    sparsity: torch.Tensor | None = None
    cross_modal: CrossModal | None = None
    token_ids: torch.Tensor | None = None
    replay_attention: torch.Tensor | None = None

    def __post_init__(self):
        if self.window_positions is None and self.window_attention is not None:
            q = self.window_attention.shape[2]
            positions = torch.arange(self.length - q, self.length, device=self.keys.device).expand(self.batch, q)
            real = torch.gather(self.valid, 1, positions)
            self.window_positions = torch.where(real, positions, -1)

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def groups(self) -> int:
        """Query heads per kv head (grouped-query attention)."""
        return self.num_query_heads // self.kv_heads

    @cached_property
    def valid(self) -> torch.Tensor:
        """[batch, seq] True on real (non-padding) tokens."""
        return self.modality != int(Modality.PAD)

    @cached_property
    def n_valid(self) -> torch.Tensor:
        return self.valid.sum(-1)

    @cached_property
    def rank(self) -> torch.Tensor:
        """[batch, seq] index of each position among its row's real tokens (padding: -1)."""
        return torch.where(self.valid, self.valid.long().cumsum(-1) - 1, -1)

    @property
    def window_valid(self) -> torch.Tensor | None:
        """[batch, Q] True on the window rows that hold a query of the set."""
        return None if self.window_positions is None else self.window_positions >= 0

    def is_modality(self, modality: Modality) -> torch.Tensor:
        return self.modality == int(modality)

    @cached_property
    def is_vision(self) -> torch.Tensor:
        """[batch, seq] image or video tokens."""
        return self.is_modality(Modality.IMAGE) | self.is_modality(Modality.VIDEO)

    def mass_by_modality(self, attention: torch.Tensor) -> torch.Tensor:
        """Attention summed over the keys of each modality: [batch, heads, (Q,) 3] for text, image, video.

        attention: [batch, heads, seq] (accumulated sums, votes) or [batch, heads, Q, seq] (window
        probabilities), its last dimension over this layer's positions; padding keys count nowhere.
        """
        onehot = torch.stack([self.is_modality(m) for m in KEY_MODALITIES], dim=-1).to(attention.dtype)
        if attention.dim() == 3:
            return torch.einsum("bhs,bsm->bhm", attention, onehot)
        return torch.einsum("bhqs,bsm->bhqm", attention, onehot)


@dataclass
class Plan:
    """A strategy's decision for one layer.

    keep: bool [batch, kv_heads or 1, seq]; True = the position stays in the cache.
    keys / values: optional full-length replacements ([batch, kv_heads, seq, head_dim]) holding the
    merged states of kept positions; only kept positions are read from them.
    """

    keep: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
