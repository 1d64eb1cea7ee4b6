"""Fidelity metrics (next-token KL, greedy agreement) and small aggregation helpers."""

from __future__ import annotations

import math

import torch


def next_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) of the next-token distributions, per row of [..., vocab] logits (float64)."""
    ref = torch.log_softmax(reference_logits.double(), -1)
    other = torch.log_softmax(logits.double(), -1)
    return (ref.exp() * (ref - other)).sum(-1).clamp(min=0.0)


def fidelity(reference_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """[steps, vocab] logits of the full cache and of a strategy, teacher-forced on the same tokens.

    kl: mean KL(full || strategy) over steps; agreement: fraction of steps with the same argmax token;
    prefix_agreement: fraction of steps before the first argmax disagreement (what free greedy decoding
    would have reproduced of the full cache's answer); steps; matched_prefix: the steps before that
    disagreement."""
    steps = reference_logits.shape[0]
    if steps == 0:
        return {"kl": 0.0, "agreement": 1.0, "prefix_agreement": 1.0, "steps": 0, "matched_prefix": 0}
    kl = next_token_kl(reference_logits, logits)
    same = reference_logits.argmax(-1) == logits.argmax(-1)
    first_diff = int((~same).nonzero()[0]) if not bool(same.all()) else steps
    return {
        "kl": float(kl.mean()),
        "agreement": float(same.double().mean()),
        "prefix_agreement": first_diff / steps,
        "steps": steps,
        "matched_prefix": first_diff,
    }


def mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None
