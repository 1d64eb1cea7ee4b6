"""The budget rule: how many of a row's prompt tokens a layer keeps."""

from __future__ import annotations

import torch

from .validate import check_fraction, check_int

# float rounding guard: 0.29 * 100 must give 29, not 28
_EPS = 1e-6


def validate_budget(budget, budget_tokens, owner: str = "strategy") -> None:
    """Raise ValueError naming the bad value and the allowed range (FieldTypeError for a wrong type)."""
    check_fraction(owner, "budget", budget, low_open=True, hint="fraction of prompt tokens kept")
    check_int(owner, "budget_tokens", budget_tokens, minimum=1, allow_none=True)
    if budget_tokens is not None and float(budget) != 1.0:
        raise ValueError(
            f"{owner}: budget={budget!r} and budget_tokens={budget_tokens!r} contradict each other; "
            "set either a fraction (budget in (0, 1]) or an absolute count (budget_tokens >= 1, with budget=1.0)"
        )


def kept_counts(n_valid: torch.Tensor, budget: float, budget_tokens: int | None = None) -> torch.Tensor:
    """Tokens kept per row: floor(budget * n), at least 1, or min(n, budget_tokens)."""
    n_valid = n_valid.long()
    if budget_tokens is not None:
        keep = torch.clamp(n_valid, max=int(budget_tokens))
    else:
        keep = torch.floor(n_valid.double() * float(budget) + _EPS).long()
        keep = torch.clamp(keep, min=1)
    return torch.minimum(keep, n_valid)
