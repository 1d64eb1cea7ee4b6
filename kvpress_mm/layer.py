"""What a strategy sees (LayerKV), what it may ask for (AttentionNeeds) and what it returns (Plan)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .modality import Modality


@dataclass(frozen=True)
class AttentionNeeds:
    """Attention statistics a strategy needs, computed by the framework during prefill.

    window: softmax probabilities of the last `window` prompt queries over all keys (SnapKV, TOVA).
    accumulated: per-key sum of probabilities over every prompt query (H2O, LOOK-M).
    """

    window: int = 0
    accumulated: bool = False

    def __post_init__(self):
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")

    @property
    def any(self) -> bool:
        return self.window > 0 or self.accumulated


@dataclass
class LayerKV:
    """One decoder layer's prompt cache, as a strategy sees it.

    keys / values: [batch, kv_heads, seq, head_dim], after RoPE, on the layer's device.
    modality: [batch, seq] int8 Modality codes; PAD marks left padding.
    keep_count: [batch] tokens this layer keeps per row (the budget rule, already applied).
    window_attention: [batch, heads, window, seq] float32 or None.
    accumulated_attention: [batch, heads, seq] float32 or None (sum over valid queries).
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

    def is_modality(self, modality: Modality) -> torch.Tensor:
        return self.modality == int(modality)


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
