"""StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): attention sinks + a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_mm.layer import LayerKV, Plan
from kvpress_mm.registry import register_strategy
from kvpress_mm.selection import first_tokens, last_tokens
from kvpress_mm.strategy import DecodePhaseMixin, EvictionStrategy
from kvpress_mm.validate import check_int

from .snapkv import prompt_memo


@register_strategy("streaming_llm")
@dataclass
class StreamingLLM(DecodePhaseMixin, EvictionStrategy):
    """Keep the first `sinks` tokens and, with the rest of the budget, the most recent ones.

    Algorithm (per row):
      1. keep = budget rule applied to the row's real tokens
      2. sinks kept = min(sinks, keep)
      3. recent window = the last keep - sinks kept tokens
    """

    sinks: int = 4

    def __post_init__(self):
        super().__post_init__()
        self._check_phase()
        check_int(type(self).__name__, "sinks", self.sinks, minimum=0)

    def promised(self, layer: LayerKV) -> torch.Tensor:
        sinks = torch.clamp(layer.keep_count, max=self.sinks)
        return first_tokens(layer, sinks) | last_tokens(layer, layer.keep_count - sinks)

    def plan(self, layer: LayerKV) -> Plan:
        # the kept positions depend on the prompt only (its labels and kept counts), not on the layer's keys:
        # the layers of one prompt share one mask (and the framework lays them out once)
        memo = prompt_memo(self, layer)
        keep = memo.get(("keep", self.sinks))
        if keep is None:
            keep = memo[("keep", self.sinks)] = self.promised(layer)[:, None, :]
        return Plan(keep=keep)
