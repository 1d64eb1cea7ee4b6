"""KNorm (Devoto et al., 2024, arXiv 2406.11430): keys with a low L2 norm draw the most attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_mm.layer import LayerKV, Plan
from kvpress_mm.registry import register_strategy
from kvpress_mm.strategy import EvictionStrategy

from .snapkv import keep_best, prompt_memo


@register_strategy("knorm")
@dataclass
class KNorm(EvictionStrategy):
    """Algorithm (per row and kv head): keep the `keep` keys of smallest L2 norm. Needs no attention."""

    def scores(self, layer: LayerKV) -> torch.Tensor:
        # -||k|| in float32 (one kernel, no float copy of the keys; the same numbers as -keys.float().norm(-1))
        return torch.linalg.vector_norm(layer.keys, dim=-1, dtype=torch.float32).neg_()

    def plan(self, layer: LayerKV) -> Plan:
        return Plan(keep=keep_best(self.scores(layer), layer, memo=prompt_memo(self, layer)))
