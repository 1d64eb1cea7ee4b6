"""Fidelity metrics (next-token KL, greedy agreement), uncertainty (Wilson / bootstrap intervals, paired
comparisons) and small aggregation helpers."""

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


# ----------------------------------------------------------------------------------------- uncertainty

Z_95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion (exact-match scores); None for n = 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at p = 0 / 1 the bound is exactly 0 / 1 (floating point lands a hair inside)
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


def bootstrap_interval(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of the mean over samples (continuous metrics); None when empty."""
    x = torch.tensor([float(v) for v in values if v is not None], dtype=torch.float64)
    if x.numel() == 0:
        return None
    if x.numel() == 1:
        return float(x[0]), float(x[0])
    gen = torch.Generator().manual_seed(seed)
    means = x[torch.randint(x.numel(), (n_boot, x.numel()), generator=gen)].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def is_binary(values) -> bool:
    return all(v in (0, 1, 0.0, 1.0, True, False) for v in values)


def score_interval(values) -> tuple[float, float] | None:
    """Wilson for 0/1 scores, bootstrap over samples otherwise."""
    values = [v for v in values if v is not None]
    if values and is_binary(values):
        return wilson_interval(sum(values), len(values))
    return bootstrap_interval(values)


def paired_comparison(a, b, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """Whether mean(a) - mean(b) over the same samples is significant at 5%.

    0/1 scores: exact McNemar test (two-sided binomial on the discordant pairs); otherwise a paired
    bootstrap of the mean difference (significant when its 95% interval excludes 0). Returns diff, ci (95%
    bootstrap of the mean difference, both cases), p (McNemar's, or None), significant, n."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return None
    d = [x - y for x, y in pairs]
    diff = sum(d) / len(d)
    ci = bootstrap_interval(d, n_boot=n_boot, seed=seed)
    p = None
    if is_binary([v for pair in pairs for v in pair]):
        wins = sum(1 for x, y in pairs if x > y)
        losses = sum(1 for x, y in pairs if x < y)
        p = _binomial_two_sided(min(wins, losses), wins + losses)
        significant = p < 0.05
    else:
        significant = ci is not None and (ci[0] > 0 or ci[1] < 0)
    return {"diff": diff, "ci": ci, "p": p, "significant": bool(significant), "n": len(pairs)}


def _binomial_two_sided(k: int, n: int) -> float:
    """P(X <= k or X >= n - k) for X ~ Binomial(n, 1/2), k <= n / 2 (1.0 when n = 0)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)
