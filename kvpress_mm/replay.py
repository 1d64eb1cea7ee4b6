"""Replay forwards: a strategy that scores a prompt by what the model needs to read it back (KVzip).

A strategy declares a replay with a method `replay_rounds(ids, modality, model) -> list[ReplayRound]`. The
session then compresses a cache's first prompt only once that prompt's forward has ended: it runs each round's
tokens through the text decoder on the uncompressed cache, records per managed layer the largest probability
every prompt key receives from the round's queries (`replay_attention`), puts every cache layer back as it was
before the round (the replay leaves no trace) and only then plans and compacts the layers.

`run_replay` does this for the session (which routes the rounds' attention calls to `record_round`) and
returns the held layers' statistics with the replay's maxima (`ReplayStats`).

A round's softmax for the statistics covers the prompt keys of its span (the others are hidden from it) and the
round's own keys, causally; the model itself attends as usual (every key). With one round whose span is the
whole prompt, the statistics are the model's own attention probabilities of the replay's queries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention_stats import _chunk_size, _grouped
from .statistics import LayerStats


@dataclass
class ReplayRound:
    """One replay forward appended to the prompt's cache.

    ids:   [B, R] long token ids, right-padded (padding ids are never read by the statistics).
    valid: [B, R] bool, True on the round's real tokens.
    span:  [B, 2] long, the prompt positions [start, end) whose keys the round's statistics cover.
    """

    ids: torch.Tensor
    valid: torch.Tensor
    span: torch.Tensor

    def __post_init__(self):
        if self.ids.dim() != 2 or self.valid.shape != self.ids.shape or tuple(self.span.shape) != (len(self.ids), 2):
            raise ValueError(
                f"a ReplayRound needs ids [B, R], valid [B, R] and span [B, 2]; got {tuple(self.ids.shape)}, "
                f"{tuple(self.valid.shape)}, {tuple(self.span.shape)}"
            )
        span = self.span.cpu()
        self.lo = int(span[:, 0].min())  # the keys any row's span covers (one host read per round)
        self.hi = int(span[:, 1].max())


@dataclass
class ReplayStats(LayerStats):
    """A deferred layer's statistics with the replay's maxima added."""

    replay_attention: torch.Tensor | None = None

    def view_fields(self) -> dict:
        return {**super().view_fields(), "replay_attention": self.replay_attention}


def replay_attention(query: torch.Tensor, key: torch.Tensor, scale: float, rnd: ReplayRound) -> torch.Tensor:
    """[B, H, L] float32: the largest probability each prompt key of the round's span gets from a real query
    of the round (0 outside the span), in query chunks (never an L x L matrix).

    query [B, H, R, D] the round's queries; key [B, Hkv, L + R, D] the prompt's keys, then the round's.
    """
    b, h, r, _ = query.shape
    kv_heads, s_len = key.shape[1], key.shape[2]
    groups = h // kv_heads
    length = s_len - r
    device = query.device
    lo, hi = rnd.lo, min(rnd.hi, length)
    n = max(hi - lo, 0)
    out = torch.zeros((b, h, length), dtype=torch.float32, device=device)
    if n == 0 or r == 0:
        return out
    keys = torch.cat([key[:, :, lo:hi], key[:, :, length:]], dim=2).float().transpose(-1, -2)
    span = rnd.span.to(device)
    at = torch.arange(lo, hi, device=device)
    in_span = (at[None, :] >= span[:, :1]) & (at[None, :] < span[:, 1:])  # [B, n]
    valid = rnd.valid.to(device)
    best = torch.zeros((b, h, n), dtype=torch.float32, device=device)
    chunk = _chunk_size(b, h, n + r)
    own = torch.arange(r, device=device)
    for i0 in range(0, r, chunk):
        i1 = min(r, i0 + chunk)
        c = i1 - i0
        q = _grouped(query[:, :, i0:i1].float() * scale, kv_heads)
        scores = torch.matmul(q, keys).view(b, kv_heads, groups, c, n + r)
        causal = own[None, :] <= torch.arange(i0, i1, device=device)[:, None]  # [c, R]
        allowed = torch.cat([in_span[:, None, :].expand(b, c, n), causal[None] & valid[:, None, :]], dim=-1)
        scores.masked_fill_(~allowed[:, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)[..., :n]
        probs.mul_(valid[:, None, None, i0:i1, None].to(probs.dtype))
        best = torch.maximum(best, probs.amax(dim=3).view(b, h, n))
    out[..., lo:hi] = best
    return out


def replay_positions(
    prompt_positions: torch.Tensor | None,
    prompt_mask: torch.Tensor | None,
    rope_deltas: torch.Tensor | None,
    length: int,
    rounds: int,
    batch: int,
    device,
) -> torch.Tensor:
    """Position ids of a round of `rounds` tokens appended to a prompt of `length` slots: each row continues after
    its prompt's largest real position (what a follow-up text prompt gets).

    prompt_positions: the prompt forward's position_ids ([B, L], or [3, B, L] M-RoPE sections, or [4, B, L] with
    the plain text positions first, as generate gives Qwen-VL), or None: then
    the model used its cache positions 0..L-1, or, where the model has Qwen-VL's rope_deltas [B, 1], each real
    token's index among its row's real tokens plus the row's delta.
    Returns [B, R], or [3, B, R] (every M-RoPE section the same: text) when the model has rope_deltas.
    """
    if prompt_positions is not None:
        pos = prompt_positions.to(device)
        real = None if prompt_mask is None else prompt_mask.to(device).bool()
        if pos.dim() == 2:
            pos = pos[None]
        elif pos.shape[0] == 4:  # Qwen-VL from generate: plain text positions first, then the M-RoPE sections
            pos = pos[1:]
        if real is not None:
            pos = pos.masked_fill(~real[None], -1)
        base = pos.amax(dim=(0, 2)) + 1
    else:
        base = torch.full((batch,), length, dtype=torch.long, device=device)
        if rope_deltas is not None:
            # Qwen-VL's own rule for later text: the token's index among the row's real ones + the row's delta
            if prompt_mask is not None:
                base = prompt_mask.to(device).long().sum(-1)
            deltas = rope_deltas.to(device).reshape(-1)
            base = base + deltas.repeat_interleave(batch // deltas.numel())
    ids = base.long()[:, None] + torch.arange(rounds, device=device)[None, :]
    mrope = rope_deltas is not None or (prompt_positions is not None and prompt_positions.dim() == 3)
    return ids[None].expand(3, batch, rounds) if mrope else ids


def snapshot(cache) -> list[dict]:
    """Every cache layer's state (shallow: its tensors are replaced, not written, by a forward's update)."""
    return [dict(vars(layer)) for layer in cache.layers]


def restore(cache, saved: list[dict]) -> None:
    """Put every layer back as `snapshot` saw it: the replay's tokens leave the cache (sliding-window layers
    too, whose window the replay pushed on)."""
    del cache.layers[len(saved) :]
    for layer, state in zip(cache.layers, saved):
        layer.__dict__.clear()
        layer.__dict__.update(state)


def record_round(scores: dict[int, torch.Tensor], idx: int, query, key, scaling, rnd: ReplayRound) -> None:
    """Add a round's attention call at layer idx to `scores` (layer -> [B, H, L] maxima over the rounds)."""
    scale = scaling or query.shape[-1] ** -0.5
    new = replay_attention(query, key, scale, rnd)
    previous = scores.get(idx)
    scores[idx] = new if previous is None else torch.maximum(previous, new)


def run_replay(
    strategy,
    model,
    decoder,
    prompt,
    cache,
    prompt_inputs: tuple,
    rope_deltas: torch.Tensor | None,
    deferred: dict[int, LayerStats],
    scores: dict[int, torch.Tensor],
    query_heads: Callable[[int], int],
    set_round: Callable[[ReplayRound | None], None],
) -> dict[int, LayerStats]:
    """The held layers' statistics for compaction, with the replay's maxima where a layer evicts.

    Runs the strategy's rounds through `decoder` on the prompt's uncompressed `cache` (each round announced by
    `set_round`, whose attention calls fill `scores` through `record_round`), putting the cache back after each;
    returns `deferred` unchanged when no layer evicts (nothing to choose: no replay).
    prompt_inputs: the prompt forward's (position_ids, [B, L] attention mask), either None.
    """
    positions, mask_2d = prompt_inputs
    if prompt.token_ids is None:
        raise ValueError(
            f"{type(strategy).__name__} replays the prompt's tokens, but this prompt was given as "
            "inputs_embeds without input_ids"
        )
    if not any(prompt.evicts(i, cache.layers[i].keys.device) for i in deferred):
        return deferred
    rounds = strategy.replay_rounds(prompt.token_ids, prompt.modality, model)
    saved = snapshot(cache)
    length = cache.get_seq_length()
    batch = prompt.token_ids.shape[0]
    device = prompt.token_ids.device
    mask = torch.ones((batch, length), dtype=torch.long, device=device) if mask_2d is None else mask_2d.long()
    try:
        with torch.no_grad():
            for rnd in rounds:
                set_round(rnd)
                ids = rnd.ids.to(device)
                position_ids = replay_positions(positions, mask_2d, rope_deltas, length, ids.shape[1], batch, device)
                decoder(
                    input_ids=ids,
                    attention_mask=torch.cat([mask, rnd.valid.to(device).long()], dim=-1),
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=True,
                )
                restore(cache, saved)
    finally:
        set_round(None)
        restore(cache, saved)
    out = {}
    for idx, stats in deferred.items():
        layer_scores = scores.get(idx)
        if layer_scores is None:  # no round (an empty replay): every key scores 0
            keys = cache.layers[idx].keys
            shape = (batch, query_heads(idx), keys.shape[2])
            layer_scores = torch.zeros(shape, dtype=torch.float32, device=keys.device)
        fields = {name: getattr(stats, name) for name in stats.__dataclass_fields__}
        fields.pop("replay_attention", None)
        out[idx] = ReplayStats(**fields, replay_attention=layer_scores)
    return out
