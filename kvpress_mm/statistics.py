"""The attention statistics a strategy declared (`AttentionNeeds`), computed during a prompt's forward.

    window:      [B, H, Q, S] float32 probabilities of up to Q = min(window, L) queries of the set over every
                 key, with window_positions [B, Q] (-1: a zero row); "last": the last Q prompt positions
    accumulated: [B, H, S]    float32 per-key sum of probabilities over the set's queries ("last": every real one)
    sparsity:    [B, H]       share of visible entries below the threshold x the query's largest probability
    cross_modal: CrossModal   mass / entropy tables between query and key modalities

S is every physical key of the layer: on a later prompt the compressed past is part of the softmax, so the
statistics of the new tokens see it as the model does. Ways to get them, cheapest first: one fused CPU pass
giving the attention output and the sums of every real query together (plain causal, with or without key
padding); the model's own kernel plus chunked statistics (Triton on CUDA for sums; a query set other than
every real query starts at its first query, so a post-vision set costs only its own rows); the eager
probabilities the model already computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_stats import (
    StatisticsReducer,
    accumulated_attention,
    allowed_from_mask,
    attention_with_statistics,
    causal_with_key_padding,
    elite_positions,
    gather_window_attention,
    hides_future,
    last_positions,
    query_statistics,
    window_attention,
)
from .layer import CROSS_GROUPS, AttentionNeeds, CrossModal
from .modality import Modality

# attention kwargs that do not change what plain causal attention computes
_PLAIN_KWARGS = {"dropout", "scaling", "position_ids", "use_cache", "output_attentions", "is_causal", "logits_to_keep"}


@dataclass
class LayerStats:
    """One layer's statistics of one prompt (each None unless the strategy asked for it).

    Iterates as (window, accumulated), the pair it replaced. token_ids: [B, L] the prompt's input ids (or None).
    """

    window: torch.Tensor | None = None
    accumulated: torch.Tensor | None = None
    window_positions: torch.Tensor | None = None
    sparsity: torch.Tensor | None = None
    cross_modal: CrossModal | None = None
    token_ids: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.window, self.accumulated))

    def trimmed(self) -> LayerStats:
        """The same statistics with the window cut to its largest number of real rows (the rows are left-padded):
        what a deferred layer holds until the prompt's end. One host read."""
        if self.window is None or self.window_positions is None or self.window.shape[2] == 0:
            return self
        rows = int((self.window_positions >= 0).sum(-1).max())
        q = self.window.shape[2]
        if rows >= q:
            return self
        self.window = self.window[:, :, q - rows :].clone()
        self.window_positions = self.window_positions[:, q - rows :].clone()
        return self

    def view_fields(self) -> dict:
        """The LayerKV fields beyond window_attention / accumulated_attention."""
        return dict(
            window_positions=self.window_positions,
            sparsity=self.sparsity,
            cross_modal=self.cross_modal,
            token_ids=self.token_ids,
        )


def modality_groups(labels: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
    """float [B, N, 3] one-hot (text, vision, any) of Modality labels [B, N]; padding (and non-members) all zero."""
    real = labels != int(Modality.PAD)
    if members is not None:
        real = real & members
    text = labels == int(Modality.TEXT)
    vision = (labels == int(Modality.IMAGE)) | (labels == int(Modality.VIDEO))
    return torch.stack([text & real, vision & real, real], dim=-1).float()


def _zero_tables(batch: int, heads: int, device) -> CrossModal:
    n = len(CROSS_GROUPS)
    zeros = torch.zeros((batch, heads, n, n), dtype=torch.float32, device=device)
    return CrossModal(zeros, zeros.clone(), torch.zeros((batch, n, n), dtype=torch.float32, device=device))


class Statistics:
    """Computes one prompt's statistics layer by layer; mask checks and query sets are cached for the prompt
    (the layers of one forward share their mask tensor and their prompt)."""

    def __init__(self, needs: AttentionNeeds, eager: bool):
        self.needs = needs
        self.eager = eager
        self._padding_masks: dict[tuple, bool] = {}  # (id, data_ptr, shape) of a mask -> causal + padding?
        self._future_hidden: dict[tuple, bool] = {}  # same key -> the mask hides every later key?
        self._sets: dict = {}  # device -> (members [B, L] or None, first member index, window positions or None)

    def prompt_attention(
        self, base, module, query, key, value, attention_mask, prompt_view, kwargs, key_modality=None
    ) -> tuple[object, LayerStats]:
        """Run the layer's attention and gather its statistics: (attention result, LayerStats).

        prompt_view: (modality [B, L], valid [B, L], n_valid [B], all valid?) of the prompt (`Prompt.on`);
        the keys' validity is in the mask. key_modality: [B, S] labels of every key (the past's and the
        prompt's), needed for the cross-modal tables and the elite window; None on a first prompt (S = L).
        """
        modality, valid, _, all_valid = prompt_view
        needs = self.needs
        query_valid = None if all_valid else valid
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        first_prompt = key.shape[2] == query.shape[2]
        if key_modality is None and first_prompt:
            key_modality = modality
        allowed = allowed_from_mask(attention_mask)
        members, lo, positions = self._query_set(query, key, scale, modality, valid, key_modality, allowed)
        if self.eager:
            output, probs = base(module, query, key, value, attention_mask, **kwargs)
            stats = self._from_probs(probs, query_valid, members, positions, allowed, modality, key_modality)
            return (output, probs), stats
        tables = self._tables_needed(key_modality, first_prompt)
        fused = None
        plain = all(k in _PLAIN_KWARGS or v is None for k, v in kwargs.items()) and not kwargs.get("dropout")
        one_pass = needs.reduces and not tables and needs.queries != "elite"
        if one_pass and plain and first_prompt and kwargs.get("is_causal", True):
            # a set whose first query is late is cheaper as its own rows (the chunked pass from there)
            query_set = members if members is None or lo < query.shape[2] // 2 else False
            if query_set is False:
                pass
            elif attention_mask is None and query_valid is None:
                fused = attention_with_statistics(query, key, value, scale, None, query_set, needs.sparsity)
            elif (
                query_valid is not None and query.device.type == "cpu" and self._is_padding_mask(attention_mask, valid)
            ):
                fused = attention_with_statistics(query, key, value, scale, valid, query_set, needs.sparsity)
        stats = LayerStats()
        if fused is not None:
            out, sums, stats.sparsity = fused
            stats.accumulated = sums if needs.accumulated else None
            result = (out.transpose(1, 2).contiguous(), None)
        else:
            result = base(module, query, key, value, attention_mask, **kwargs)
        if needs.rows:
            if positions is None:
                stats.window = window_attention(query, key, scale, needs.window, allowed, query_valid)
                stats.window_positions = self._last_window(valid, needs.window)
            else:
                stats.window = gather_window_attention(query, key, scale, positions, allowed)
                stats.window_positions = positions
        if needs.tables and not tables:
            stats.cross_modal = _zero_tables(query.shape[0], query.shape[1], query.device)
        if needs.reduces and fused is None:
            if needs.queries == "elite":
                self._reduce_window(stats, key.shape[2], allowed, modality, key_modality, tables)
            else:
                rows = members if members is not None else query_valid
                self._reduce(
                    stats, query, key, scale, attention_mask, allowed, rows, lo, modality, key_modality, tables
                )
        return result, stats

    def _tables_needed(self, key_modality, first_prompt: bool) -> bool:
        """Whether this layer's cross-modal tables must be computed: "between" tables are all zero when every
        real key is of one modality (text only, or vision only); read once per prompt, per layer on a later one."""
        needs = self.needs
        if not needs.tables or needs.cross_modal == "all":
            return needs.tables
        cache_key = ("tables", key_modality.device) if first_prompt else None
        if cache_key in self._sets:
            return self._sets[cache_key]
        groups = modality_groups(key_modality)
        both = bool((groups[..., 0].any(-1) & groups[..., 1].any(-1)).any())
        if cache_key is not None:
            self._sets[cache_key] = both
        return both

    # ------------------------------------------------------------------ query sets
    def _query_set(self, query, key, scale, modality, valid, key_modality, allowed):
        """(members [B, L] bool or None = every real query, first member index, window positions or None =
        the last positions) of this layer's query set."""
        needs = self.needs
        if needs.queries == "last":
            return None, 0, None
        if needs.queries == "recent":
            length = valid.shape[1]
            lo = max(0, length - needs.window)
            recent = torch.arange(length, device=valid.device)[None, :] >= lo
            return valid & recent, lo, None
        if needs.queries == "elite":
            query_text = valid & (modality == int(Modality.TEXT))
            key_text = key_modality == int(Modality.TEXT)
            positions = elite_positions(
                query, key, scale, query_text, key_text, needs.window, needs.elite_threshold, allowed
            )
            members = torch.zeros_like(valid).scatter_(1, positions.clamp(min=0), positions >= 0)
            return members, 0, positions
        device = modality.device
        if device not in self._sets:
            text = valid & (modality == int(Modality.TEXT))
            if needs.queries == "post_vision":
                vision = (modality == int(Modality.IMAGE)) | (modality == int(Modality.VIDEO))
                index = torch.arange(modality.shape[1], device=device)
                last_vision = torch.where(vision, index, -1).amax(-1, keepdim=True)
                members = text & (index[None, :] > last_vision)
            else:
                members = text
            # the set's rows start here in every row (one host read per prompt); the pass skips the rows before
            first = torch.where(members.any(-1), members.int().argmax(-1), members.shape[1]).min()
            positions = last_positions(members, needs.window) if needs.window else None
            self._sets[device] = (members, min(int(first), modality.shape[1] - 1), positions)
        return self._sets[device]

    @staticmethod
    def _last_window(valid: torch.Tensor, window: int) -> torch.Tensor:
        """long [B, w] positions of the last w = min(window, L) prompt positions, -1 on padding."""
        length = valid.shape[1]
        w = min(window, length)
        positions = torch.arange(length - w, length, device=valid.device)
        return torch.where(valid[:, length - w :], positions, -1)

    # ------------------------------------------------------------------ reductions over the set
    def _reduce(self, stats, query, key, scale, attention_mask, allowed, rows, lo, modality, key_modality, tables):
        """Sums / sparsity / cross-modal tables over the queries `rows` (bool [B, L], None: all), from row lo."""
        needs = self.needs
        first_prompt = key.shape[2] == query.shape[2]
        # a later prompt's masks are built per layer (fresh tensors): not cached, and not needed for speed
        within_causal = allowed is not None and first_prompt and self._hides_future(attention_mask, allowed)
        if lo:
            query = query[:, :, lo:]
            allowed = None if allowed is None else allowed[:, :, lo:]
            rows = rows[:, lo:]
            modality = modality[:, lo:]
        if not (needs.sparsity or tables):
            if needs.accumulated:
                stats.accumulated = accumulated_attention(query, key, scale, allowed, rows, within_causal)
            return
        key_groups = query_groups = None
        if tables:
            key_groups = modality_groups(key_modality)
            query_groups = modality_groups(modality, rows)
        result = query_statistics(
            query, key, scale, allowed, rows, within_causal, needs.accumulated, needs.sparsity, key_groups, query_groups
        )
        stats.accumulated, stats.sparsity = result.accumulated, result.sparsity
        if result.cross_modal is not None:
            stats.cross_modal = CrossModal(*result.cross_modal)

    def _reduce_window(self, stats, s_len, allowed, modality, key_modality, tables):
        """The reductions over an elite set from its window rows (the window holds the whole set)."""
        needs = self.needs
        probs, positions = stats.window, stats.window_positions
        rows = positions >= 0
        if not (needs.sparsity or tables):
            stats.accumulated = probs.sum(2) if needs.accumulated else None
            return
        b, h, n, _ = probs.shape
        at = positions.clamp(min=0)
        if allowed is not None:
            visible = torch.gather(allowed, 2, at[:, None, :, None].expand(b, allowed.shape[1], n, s_len))
        else:
            length = modality.shape[1]
            visible = torch.arange(s_len, device=probs.device)[None, None, :] <= (s_len - length + at)[:, :, None]
            visible = visible[:, None]
        key_groups = query_groups = None
        if tables:
            key_groups = modality_groups(key_modality)
            query_groups = modality_groups(torch.gather(modality, 1, at), rows)
        reducer = StatisticsReducer(
            b, h, s_len, probs.device, needs.accumulated, needs.sparsity, key_groups, query_groups
        )
        reducer.add(probs, 0, visible, rows)
        result = reducer.result()
        stats.accumulated, stats.sparsity = result.accumulated, result.sparsity
        if result.cross_modal is not None:
            stats.cross_modal = CrossModal(*result.cross_modal)

    def _from_probs(self, probs, query_valid, members, positions, allowed, modality, key_modality) -> LayerStats:
        """The statistics from the eager probabilities [B, H, L, S] the model computed."""
        needs = self.needs
        probs = probs.float()
        stats = LayerStats()
        rows = members if members is not None else query_valid
        if needs.rows:
            if positions is None:
                masked = probs if query_valid is None else probs * query_valid[:, None, :, None]
                stats.window = masked[:, :, -needs.window :]
                stats.window_positions = self._last_window(modality != int(Modality.PAD), needs.window)
            else:
                b, h, _, s_len = probs.shape
                at = positions.clamp(min=0)[:, None, :, None].expand(b, h, positions.shape[1], s_len)
                stats.window = torch.gather(probs, 2, at) * (positions >= 0)[:, None, :, None]
                stats.window_positions = positions
        tables = self._tables_needed(key_modality, probs.shape[2] == probs.shape[3])
        if needs.tables and not tables:
            stats.cross_modal = _zero_tables(probs.shape[0], probs.shape[1], probs.device)
        if not needs.reduces:
            return stats
        summed = probs if rows is None else probs * rows[:, None, :, None]
        if not (needs.sparsity or tables):
            stats.accumulated = summed.sum(2) if needs.accumulated else None
            return stats
        b, h, length, s_len = probs.shape
        if allowed is None:
            visible = torch.ones((length, s_len), dtype=torch.bool, device=probs.device).tril_(s_len - length)
            visible = visible[None, None]
        else:
            visible = allowed
        key_groups = query_groups = None
        if tables:
            key_groups = modality_groups(key_modality)
            query_groups = modality_groups(modality, rows)
        reducer = StatisticsReducer(
            b, h, s_len, probs.device, needs.accumulated, needs.sparsity, key_groups, query_groups
        )
        reducer.add(summed, 0, visible, rows)
        result = reducer.result()
        stats.accumulated, stats.sparsity = result.accumulated, result.sparsity
        if result.cross_modal is not None:
            stats.cross_modal = CrossModal(*result.cross_modal)
        return stats

    @staticmethod
    def decode_probs(query, key, attention_mask, kwargs) -> torch.Tensor:
        """Probabilities of the decode queries over the layer's keys, [B, H, q, S] float32."""
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        return window_attention(query, key, scale, query.shape[2], allowed_from_mask(attention_mask))

    def _is_padding_mask(self, attention_mask, valid: torch.Tensor) -> bool:
        """Whether the layer's mask is plain causal + key padding, once per mask per prompt."""
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
            return False
        key = (id(attention_mask), attention_mask.data_ptr(), tuple(attention_mask.shape))
        if key not in self._padding_masks:
            self._padding_masks[key] = causal_with_key_padding(allowed_from_mask(attention_mask), valid)
        return self._padding_masks[key]

    def _hides_future(self, attention_mask, allowed: torch.Tensor) -> bool:
        """Whether the layer's mask is causal (padding or a window aside), once per mask per prompt: the
        statistics may then skip the key blocks after each query block."""
        key = (id(attention_mask), attention_mask.data_ptr(), tuple(attention_mask.shape))
        if key not in self._future_hidden:
            self._future_hidden[key] = hides_future(allowed)
        return self._future_hidden[key]
