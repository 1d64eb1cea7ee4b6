"""The abstract EvictionStrategy: a dataclass whose fields are its whole configuration."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from .budget import kept_counts, validate_budget
from .layer import AttentionNeeds, LayerKV, Plan


PHASES = ("prefill", "decode", "both")


@dataclass
class EvictionStrategy(ABC):
    """Base of every strategy.

    budget: fraction of each row's prompt tokens a layer keeps, in (0, 1].
    budget_tokens: keep at most this many tokens per layer instead (with budget=1.0).

    Subclasses implement `plan(layer)`; `needs()` declares the attention statistics they read.
    Use as `with strategy(model): model.generate(...)`.
    """

    budget: float = 1.0
    budget_tokens: int | None = None

    # each (row, kv head) keeps exactly kept_counts() tokens; False: more may be kept (keep_all_text)
    exact_budget: ClassVar[bool] = True
    # heads of a layer keep different counts that sum to kept_counts() * kv_heads (AdaKV)
    headwise_budgets: ClassVar[bool] = False

    def __post_init__(self):
        validate_budget(self.budget, self.budget_tokens, owner=type(self).__name__)

    def needs(self) -> AttentionNeeds:
        """Attention statistics this strategy reads from the LayerKV (none by default)."""
        return AttentionNeeds()

    def kept_counts(self, n_valid: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
        """Tokens layer `layer_idx` keeps per row; override for per-layer budgets (PyramidKV)."""
        return kept_counts(n_valid, self.budget, self.budget_tokens)

    def compress_prefill(self) -> bool:
        """Whether to compress at the end of prefill (True for every built-in except phase='decode')."""
        return True

    def decode_interval(self) -> int:
        """Compress during decoding whenever this many tokens exceed the budget (0: never)."""
        return 0

    def promised(self, layer: LayerKV) -> torch.Tensor | None:
        """bool [batch, seq] positions this strategy always keeps (sinks, windows), or None."""
        return None

    @abstractmethod
    def plan(self, layer: LayerKV) -> Plan:
        """Decide which positions each (row, kv head) keeps, and optionally how evicted ones merge."""

    def __call__(self, model: torch.nn.Module):
        """A context manager compressing `model`'s KV cache at the end of each prefill."""
        from .session import CompressionSession

        return CompressionSession(self, model)


@dataclass
class DecodePhaseMixin:
    """Fields of strategies that can also evict while tokens are generated.

    phase: "prefill" (compress once after the prompt), "decode" (keep the prompt, then hold the cache
    at the budget while generating) or "both". compress_every: evict whenever this many tokens exceed
    the budget, so the cache never holds more than budget + compress_every tokens.
    """

    phase: str = "prefill"
    compress_every: int = 1

    def _check_phase(self) -> None:
        name = type(self).__name__
        if self.phase not in PHASES:
            raise ValueError(f"{name}: phase must be one of {', '.join(PHASES)}; got {self.phase!r}")
        every = self.compress_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{name}: compress_every must be an integer >= 1, got {every!r}")

    def compress_prefill(self) -> bool:
        return self.phase in ("prefill", "both")

    def decode_interval(self) -> int:
        return self.compress_every if self.phase in ("decode", "both") else 0
