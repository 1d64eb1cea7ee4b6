"""random: a uniformly random subset of the prompt (the floor every method should beat)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_mm.layer import LayerKV, Plan
from kvpress_mm.registry import register_strategy
from kvpress_mm.selection import keep_top
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.validate import check_int

# seed * 100_003 + layer index must stay within torch.Generator.manual_seed's range
MAX_SEED = 2**32 - 1


@register_strategy("random")
@dataclass
class RandomEviction(EvictionStrategy):
    """Algorithm (per row and kv head): keep `keep` positions drawn uniformly; `seed` makes it repeatable."""

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int(type(self).__name__, "seed", self.seed, minimum=0, maximum=MAX_SEED)

    def scores(self, layer: LayerKV) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + layer.layer_idx)
        return torch.rand(layer.keys.shape[:3], generator=gen).to(layer.keys.device)

    def plan(self, layer: LayerKV) -> Plan:
        return Plan(keep=keep_top(self.scores(layer), layer))
