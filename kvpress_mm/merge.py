"""KV merging: evicted tokens are folded into the kept token whose key is most similar (LOOK-M).

Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context
Inference", EMNLP 2024 Findings, arXiv 2406.18139, Sec. 3.3. Per (row, kv head):

    S = cosine(K_evicted, K_kept);  j*(e) = argmax_j S[e, j];  s_e = S[e, j*(e)]
    averaged:  k_j <- (k_j + sum_{e: j*(e)=j} k_e) / (1 + n_j)
    pivotal:   k_j <- (k_j + sum_{e: j*(e)=j} (k_e + k_j) / 2) / (1 + n_j)
    weighted:  k_j <- (k_j + sum_{e in F, j*(e)=j} w_e k_e) / (1 + sum_{e in F, j*(e)=j} w_e)
               F = {e : s_e >= mean of s over this (row, head)'s evicted tokens}, w_e = max(s_e, 0)

Values follow the keys' match j*. Keys are merged after RoPE, as in the paper.
Fixes over the released code (see docs/look-m.md): the averaged update pairs every evicted token
with its own match (the release scattered a filtered index against the unfiltered source); the
weighted filter is taken per (row, head), not one mask shared by all heads; weighted updates are
normalised by the weights' sum, so a merged key stays a convex combination.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache_ops import flat_rows, gather_positions, index_from_order, kept_order, put_rows

MERGE_MODES = ("none", "averaged", "pivotal", "weighted")
MERGE_SCOPES = ("any", "same_modality")

# evicted tokens matched per chunk: bounds the [batch, heads, chunk, kept] similarity block
_CHUNK_ELEMENTS = 1024 * 1024  # small blocks stay in cache: ~2x faster than large ones on CPU
# on a GPU each chunk costs a dozen kernel launches: 1M-element chunks made a mid layer's merge at 8k
# ~160 chunks (LOOK-M ~35x plain sdpa in bf16 on an H200); 16M (64 MB in fp32) makes it ~10
_CHUNK_ELEMENTS_GPU = 16 * 1024 * 1024


_ARGMAX_BLOCK = 64


def first_argmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, index of its first occurrence) over the last dim, like `torch.max(scores, -1)`.

    On CPU `max` with indices runs ~10x slower than `amax`: the maximum of every 64-wide block is found
    with `amax`, and only the winning block is searched for the index. Elsewhere `max` is used as is
    (it returns the first index of the maximum too).
    """
    width = scores.shape[-1]
    n_blocks = width // _ARGMAX_BLOCK
    if n_blocks < 2 or scores.device.type != "cpu":
        return torch.max(scores, dim=-1)
    main = n_blocks * _ARGMAX_BLOCK
    block_max = scores[..., :main].unflatten(-1, (n_blocks, _ARGMAX_BLOCK)).amax(-1)
    if main < width:
        block_max = torch.cat([block_max, scores[..., main:].amax(-1, keepdim=True)], dim=-1)
    best, block = torch.max(block_max, dim=-1)
    start = block * _ARGMAX_BLOCK
    # the last block may be short: its clamped indices repeat the final column after the real ones
    columns = (start[..., None] + torch.arange(_ARGMAX_BLOCK, device=scores.device)).clamp_(max=width - 1)
    hit = torch.gather(scores, -1, columns) == best[..., None]
    return best, start + hit.to(torch.uint8).argmax(-1)


def _orders(keep: torch.Tensor, evict: torch.Tensor, kept_full: bool, n_kept: int, n_evicted: int):
    """(kept_index, kept_valid, evicted_index, evicted_valid) as `index_from_order` gives them; when every
    (row, head) keeps n_kept, from one stable sort (other < evicted < kept) instead of two: the valid entries
    are the same, only the left filler of the evicted index differs (other positions; never read)."""
    kept_counts, evicted_counts = keep.sum(-1), evict.sum(-1)
    if not kept_full:
        kept_index, kept_valid = index_from_order(kept_order(keep), kept_counts, n_kept)
        evicted_index, evicted_valid = index_from_order(kept_order(evict), evicted_counts, n_evicted)
        return kept_index, kept_valid, evicted_index, evicted_valid
    length = keep.shape[-1]
    order = (keep.to(torch.uint8) * 2 + evict.to(torch.uint8)).argsort(dim=-1, stable=True)
    kept_index = order[..., length - n_kept :]
    kept_valid = torch.ones(kept_index.shape, dtype=torch.bool, device=keep.device)
    evicted_index = order[..., length - n_kept - n_evicted : length - n_kept]
    evicted_valid = torch.arange(n_evicted, device=keep.device) >= (n_evicted - evicted_counts)[..., None]
    return kept_index, kept_valid, evicted_index, evicted_valid


def nearest_kept(
    keys: torch.Tensor,
    keep: torch.Tensor,
    evict: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match every evicted position to the kept position with the most similar key (cosine).

    keys [B, H, L, D]; keep / evict bool [B, H, L]; labels [B, L] (optional): match only within
    the same label. Returns (kept_index [B,H,K], kept_valid [B,H,K], evicted_index [B,H,E],
    match [B,H,E] (slot in kept_index, -1 where there is no match or no evicted token), similarity [B,H,E]).

    The evicted keys are gathered and their norms taken once; each chunk of them is one matmul and one
    argmax (a single chunk on a GPU unless the block passes 16M elements).
    """
    b, h, length, d = keys.shape
    kept_counts, evicted_counts = keep.sum(-1), evict.sum(-1)
    # the layout's sizes in one host read (on a GPU each read waits for the queued kernels)
    n_kept, n_evicted, fewest_kept = torch.stack([kept_counts.max(), evicted_counts.max(), kept_counts.min()]).tolist()
    kept_full = fewest_kept == n_kept
    if n_kept == 0 or n_evicted == 0:
        kept_index, kept_valid, evicted_index, _ = _orders(keep, evict, False, n_kept, n_evicted)
        match = torch.full((b, h, n_evicted), -1, dtype=torch.long, device=keys.device)
        similarity = torch.zeros((b, h, n_evicted), dtype=torch.float32, device=keys.device)
        return kept_index, kept_valid, evicted_index, match, similarity
    kept_index, kept_valid, evicted_index, evicted_valid = _orders(keep, evict, kept_full, n_kept, n_evicted)
    states = keys.float()
    kept_unit = F.normalize(gather_positions(states, kept_index), dim=-1)
    blocked = None if kept_full else ~kept_valid[:, :, None, :]
    if labels is not None:
        labels_bh = labels[:, None, :].expand(b, h, -1)
        kept_labels = torch.gather(labels_bh, 2, kept_index)
        evicted_labels = torch.gather(labels_bh, 2, evicted_index)
    on_cpu = keys.device.type == "cpu"
    chunk = max(1, (_CHUNK_ELEMENTS if on_cpu else _CHUNK_ELEMENTS_GPU) // max(1, b * h * n_kept))
    kept_unit_t = kept_unit.transpose(-1, -2).contiguous()
    # the evicted keys at once (a GPU, or a single chunk): gathered and their norms taken in one kernel each;
    # a CPU's chunks gather their own (each block stays in cache)
    at_once = not on_cpu or chunk >= n_evicted
    evicted = gather_positions(states, evicted_index) if at_once else None
    pieces = []
    for e0 in range(0, n_evicted, chunk):
        e1 = min(n_evicted, e0 + chunk)
        part = evicted[:, :, e0:e1] if at_once else gather_positions(states, evicted_index[:, :, e0:e1])
        # the argmax of cosine needs only the kept side normalised; the evicted norm rescales the best value
        sim = part @ kept_unit_t  # [B, H, c, K]
        if blocked is not None:
            sim.masked_fill_(blocked, float("-inf"))
        if labels is not None:
            sim.masked_fill_(evicted_labels[:, :, e0:e1, None] != kept_labels[:, :, None, :], float("-inf"))
        best, slot = first_argmax(sim)
        pieces.append((best if at_once else best / part.norm(dim=-1).clamp(min=1e-12), slot))
    if len(pieces) == 1:
        best, slot = pieces[0]
    else:
        best, slot = torch.cat([p[0] for p in pieces], dim=-1), torch.cat([p[1] for p in pieces], dim=-1)
    if at_once:
        best = best / evicted.norm(dim=-1).clamp(min=1e-12)
    found = evicted_valid & torch.isfinite(best)
    match = torch.where(found, slot, -1)
    similarity = torch.where(found, best, 0.0)
    return kept_index, kept_valid, evicted_index, match, similarity


def merge_evicted(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor,
    mode: str,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-length keys / values where each kept position holds its merged state.

    keys, values [B, H, L, D]; keep bool [B, H|1, L]; valid bool [B, L] (evicted = valid & ~keep);
    mode in MERGE_MODES; labels [B, L] restrict merging to the same label (merge_scope=same_modality).
    Positions that are not kept are returned unchanged (the framework drops them).
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {mode!r}")
    if mode == "none":
        return keys, values
    b, h, length, d = keys.shape
    keep = keep.expand(b, h, length)
    evict = valid[:, None, :] & ~keep
    kept_index, _, evicted_index, match, similarity = nearest_kept(keys, keep, evict, labels)
    if evicted_index.shape[-1] == 0:
        return keys, values
    found = match >= 0
    weight = found.float()
    if mode == "weighted":
        # per (row, head): only evicted tokens at least as similar as that head's average take part
        n_found = found.sum(-1, keepdim=True).clamp(min=1)
        mean_sim = (similarity * found).sum(-1, keepdim=True) / n_found
        weight = torch.where(found & (similarity >= mean_sim), similarity.clamp(min=0.0), 0.0)
    # Every mode is  k_j <- (a_j k_j + c sum_{e -> j} w_e k_e) / (1 + W_j),  W_j = sum_{e -> j} w_e;
    # pivotal's (k_e + k_j) / 2 terms give a_j = 1 + W_j / 2 and c = 1/2, the others a_j = 1, c = 1.
    # Written this way no [evicted, D] copy of the pivots is ever formed.
    n_kept = kept_index.shape[-1]
    target = match.clamp(min=0)  # unmatched tokens carry weight 0
    kept_rows = torch.arange(0, b * h * n_kept, n_kept, device=keys.device).view(b, h, 1) + target
    mass = torch.zeros((b, h, n_kept), device=keys.device).scatter_add_(2, target, weight)
    kept_scale = (1.0 + mass / 2)[..., None] if mode == "pivotal" else None  # the others: a_j = 1
    evicted_scale = 0.5 if mode == "pivotal" else 1.0
    denominator = 1.0 + mass[..., None]
    if mode != "weighted":
        spare = b * h * n_kept
        target_rows = torch.full((b, h, length), spare, dtype=torch.long, device=keys.device)
        target_rows.scatter_(2, evicted_index, torch.where(found, kept_rows, spare))
        target_rows = target_rows.view(-1)
    else:
        evicted_rows = flat_rows(evicted_index, b, h, length)
    rows = flat_rows(kept_index, b, h, length)  # the kept positions' rows, read and written for keys and values
    new_states = []
    for states in (keys, values):
        states32 = states.float()
        flat = states32.reshape(-1, states.shape[-1])
        kept = flat.index_select(0, rows)
        if mode == "weighted":
            summed = torch.zeros_like(kept)
            evicted = flat.index_select(0, evicted_rows).view(b, h, -1, flat.shape[-1]).mul_(weight[..., None])
            summed.index_add_(0, kept_rows.reshape(-1), evicted.reshape(-1, flat.shape[-1]))
        else:
            # weights are 0 / 1: every position adds straight from the full-length states into its
            # pivot's row, or into a spare last row (kept, unmatched, padding): no [evicted, D] copy
            summed = kept.new_zeros(spare + 1, flat.shape[-1]).index_add_(0, target_rows, flat)[:-1]
        kept = kept.view(b, h, n_kept, -1)
        if kept_scale is not None:
            kept = kept * kept_scale
        merged = (kept + summed.view_as(kept) * evicted_scale) / denominator
        new_states.append(put_rows(states, rows, merged.to(states.dtype)))
    return new_states[0], new_states[1]
