"""Cross-layer budgets: a strategy with `budget_scope = "model"` allocates its layers' kept counts together.

Once every managed layer of a prompt has run, the session hands the held layers here: each layer's
`layer_summary` is asked of the `LayerKV` view of its prompt slots, then the strategy's
`allocate(summaries, n_valid, num_layers)` gives every layer's [B] kept counts, which must keep in all what
the uniform budget rule would (each layer at least 1 and at most its row's real tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .compaction import layer_view
from .statistics import LayerStats


def allocate_counts(
    strategy,
    prompt,
    cache,
    order: list[int],
    deferred: dict[int, LayerStats],
    uniform: torch.Tensor,
    num_layers: int,
    query_heads: Callable[[int], int],
) -> dict[int, torch.Tensor]:
    """layer -> [B] kept counts (on the layer's device) of the held layers `order`, from the strategy's
    allocation over every layer's summary; checked to keep in all what `uniform` ([B], one layer) would."""
    summaries = []
    for i in order:
        layer = cache.layers[i]
        view = summary_view(prompt, i, num_layers, layer.keys, layer.values, deferred[i], query_heads(i))
        summaries.append(strategy.layer_summary(view))
    _, _, n_valid, _ = prompt.on(uniform.device)
    counts = strategy.allocate(summaries, n_valid, len(order))
    name = type(strategy).__name__
    expected = (len(order), n_valid.shape[0])
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != expected or counts.is_floating_point():
        got = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise ValueError(f"{name}.allocate returned {got}; expected integer counts of shape {expected}")
    counts = counts.to(uniform.device).long()
    bad = torch.stack(
        [
            (counts.sum(0) != uniform * len(order)).any(),
            (counts < torch.clamp(n_valid, max=1)[None]).any() | (counts > n_valid[None]).any(),
        ]
    ).tolist()
    if bad[0]:
        raise ValueError(f"{name}.allocate must keep in all what the uniform budget keeps ({len(order)} x uniform)")
    if bad[1]:
        raise ValueError(f"{name}.allocate gave a layer fewer than 1 or more than its row's real tokens")
    return {i: counts[j].to(cache.layers[i].keys.device) for j, i in enumerate(order)}


def summary_view(prompt, idx: int, num_layers: int, keys, values, stats: LayerStats, query_heads: int):
    """The LayerKV layer_summary sees: the prompt's slots (a later prompt: the last L), uniform keep counts."""
    device = keys.device
    start = keys.shape[2] - prompt.length
    window, accumulated = stats
    return layer_view(
        idx,
        num_layers,
        keys[:, :, start:],
        values[:, :, start:],
        prompt.on(device)[0],
        prompt.keep_counts(idx, device),
        query_heads,
        None if window is None else window[..., start:],
        None if accumulated is None else accumulated[..., start:],
        **stats.view_fields(),
    )
