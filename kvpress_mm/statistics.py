"""The attention statistics a strategy declared (`AttentionNeeds`), computed during a prompt's forward.

    window:      [B, H, w, S] float32 probabilities of the last w prompt queries over every key
    accumulated: [B, H, S]    float32 per-key sum of probabilities over the prompt's real queries

S is every physical key of the layer: on a later prompt the compressed past is part of the softmax, so the
statistics of the new tokens see it as the model does. Four ways to get them, cheapest first: one fused
CPU pass giving the attention output and the sums together (plain causal, with or without key padding);
the model's own kernel plus chunked statistics; the eager probabilities the model already computed.
"""

from __future__ import annotations

import torch

from .attention_stats import (
    accumulated_attention,
    allowed_from_mask,
    attention_with_accumulated,
    causal_with_key_padding,
    hides_future,
    window_attention,
)
from .layer import AttentionNeeds

# attention kwargs that do not change what plain causal attention computes
_PLAIN_KWARGS = {"dropout", "scaling", "position_ids", "use_cache", "output_attentions", "is_causal", "logits_to_keep"}


class Statistics:
    """Computes one prompt's statistics layer by layer; mask checks are cached for the prompt (the layers of
    one forward share their mask tensor)."""

    def __init__(self, needs: AttentionNeeds, eager: bool):
        self.needs = needs
        self.eager = eager
        self._padding_masks: dict[tuple, bool] = {}  # (id, data_ptr, shape) of a mask -> causal + padding?
        self._future_hidden: dict[tuple, bool] = {}  # same key -> the mask hides every later key?

    def prompt_attention(self, base, module, query, key, value, attention_mask, valid, all_valid, kwargs):
        """Run the layer's attention and gather its statistics: (attention result, (window, accumulated)).

        valid: bool [B, L] real prompt queries; the keys' validity is in the mask.
        """
        query_valid = None if all_valid else valid
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        if self.eager:
            output, probs = base(module, query, key, value, attention_mask, **kwargs)
            return (output, probs), self._from_probs(probs, query_valid)
        fused = None
        first_prompt = key.shape[2] == query.shape[2]
        plain = all(k in _PLAIN_KWARGS or v is None for k, v in kwargs.items()) and not kwargs.get("dropout")
        if self.needs.accumulated and plain and first_prompt and kwargs.get("is_causal", True):
            if attention_mask is None and query_valid is None:
                fused = attention_with_accumulated(query, key, value, scale)
            elif (
                query_valid is not None and query.device.type == "cpu" and self._is_padding_mask(attention_mask, valid)
            ):
                fused = attention_with_accumulated(query, key, value, scale, key_valid=valid)
        if fused is not None:
            out, accumulated = fused
            result = (out.transpose(1, 2).contiguous(), None)
        else:
            accumulated = None
            result = base(module, query, key, value, attention_mask, **kwargs)
        allowed = allowed_from_mask(attention_mask)
        window = None
        if self.needs.window:
            window = window_attention(query, key, scale, self.needs.window, allowed, query_valid)
        if self.needs.accumulated and accumulated is None:
            # a later prompt's masks are built per layer (fresh tensors): not cached, and not needed for speed
            within_causal = allowed is not None and first_prompt and self._hides_future(attention_mask, allowed)
            accumulated = accumulated_attention(query, key, scale, allowed, query_valid, within_causal)
        return result, (window, accumulated)

    @staticmethod
    def decode_probs(query, key, attention_mask, kwargs) -> torch.Tensor:
        """Probabilities of the decode queries over the layer's keys, [B, H, q, S] float32."""
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        return window_attention(query, key, scale, query.shape[2], allowed_from_mask(attention_mask))

    def _from_probs(self, probs: torch.Tensor, query_valid):
        probs = probs.float()
        if query_valid is not None:
            probs = probs * query_valid[:, None, :, None]
        window = probs[:, :, -self.needs.window :] if self.needs.window else None
        accumulated = probs.sum(2) if self.needs.accumulated else None
        return window, accumulated

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
