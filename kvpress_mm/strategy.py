"""The abstract EvictionStrategy: a dataclass whose fields are its whole configuration."""

from __future__ import annotations

import dataclasses
from abc import ABC, ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from .budget import kept_counts, validate_budget
from .layer import AttentionNeeds, LayerKV, Plan
from .validate import check_choice, check_int, warn_ignored

PHASES = ("prefill", "decode", "both")
# which prompts a cache compresses: its first one only (later turns and questions are read as they are), or
# every prompt (each later turn's new tokens are compressed to the budget too, the past kept as it is)
COMPRESS_MODES = ("first_prompt", "every_prompt")

# instance-dict flags: construction has finished / __post_init__ is being re-run for an assignment
_READY = "_kvpress_mm_ready"
_REVALIDATING = "_kvpress_mm_revalidating"
_FIELD_NAMES: dict[type, frozenset] = {}


class _StrategyMeta(ABCMeta):
    """Marks a strategy ready for validated assignment once its __init__ and __post_init__ have run."""

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        obj.__dict__[_READY] = True
        return obj


def _field_names(cls: type) -> frozenset:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    return names


@dataclass
class EvictionStrategy(ABC, metaclass=_StrategyMeta):
    """Base of every strategy.

    budget: fraction of each row's prompt tokens a layer keeps, in (0, 1].
    budget_tokens: keep at most this many tokens per layer instead (with budget=1.0).
    compress: "first_prompt" (default: compress the first prompt a cache sees; follow-up turns and the
    questions asked about a compressed context are appended as they are) or "every_prompt" (each later
    prompt's new tokens are compressed to the budget too, with statistics over the compressed past).

    Subclasses implement `plan(layer)`; `needs()` declares the attention statistics they read.
    Use as `with strategy(model): model.generate(...)`.

    Fields are validated in `__post_init__` (subclasses extend it, calling super().__post_init__()
    first), at construction and again after every later assignment of a field: `strategy.budget = 0.3`
    re-runs `__post_init__` on the new value, and when it raises, every attribute is put back as it was
    and the error propagates. So `__post_init__` must only check fields and (re)build derived state
    from them, which is what AdaKV's inner scorer is; a field it ignores is reported by a UserWarning.
    """

    budget: float = 1.0
    budget_tokens: int | None = None
    compress: str = "first_prompt"

    # each (row, kv head) keeps exactly kept_counts() tokens; False: more may be kept (keep_all_text)
    exact_budget: ClassVar[bool] = True
    # heads of a layer keep different counts that sum to kept_counts() * kv_heads (AdaKV)
    headwise_budgets: ClassVar[bool] = False

    def __post_init__(self):
        validate_budget(self.budget, self.budget_tokens, owner=type(self).__name__)
        check_choice(type(self).__name__, "compress", self.compress, COMPRESS_MODES)

    def __setattr__(self, name, value):
        state = self.__dict__
        if not state.get(_READY) or state.get(_REVALIDATING) or name not in _field_names(type(self)):
            # during construction (dataclass __init__ sets fields one by one), inside the re-validation,
            # or a non-field attribute: a plain assignment
            super().__setattr__(name, value)
            return
        saved = dict(state)
        super().__setattr__(name, value)
        state[_REVALIDATING] = True
        try:
            self.__post_init__()  # the other fields' current values take part (budget vs budget_tokens)
        except BaseException:
            state.clear()
            state.update(saved)
            raise
        finally:
            state.pop(_REVALIDATING, None)

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

    def __call__(self, model: torch.nn.Module, layout: str | None = None):
        """A context manager compressing `model`'s KV cache at the end of each prefill.

        layout: how compacted layers with padding slots (head-wise budgets, padded batches) are stored: "padded"
        (to the widest head, spare slots masked), "flat" (only the kept slots) or "auto" (flat for head-wise
        budgets unless the strategy also compresses while decoding, else padded); None: the environment's
        KVPRESS_MM_LAYOUT, else "auto" (docs/strategies-heads.md, "Head-wise budgets and memory")."""
        from .session import CompressionSession

        return CompressionSession(self, model, layout)


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
        check_choice(name, "phase", self.phase, PHASES)
        check_int(name, "compress_every", self.compress_every, minimum=1)
        if self.phase == "prefill" and self.compress_every != 1:
            warn_ignored(name, "compress_every", self.compress_every, 'it applies to phase="decode" or "both" only')

    def compress_prefill(self) -> bool:
        return self.phase in ("prefill", "both")

    def decode_interval(self) -> int:
        return self.compress_every if self.phase in ("decode", "both") else 0
