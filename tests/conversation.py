"""Test helpers for multi-turn runs: a conversation driven the usual transformers way, and its masked reference.

The reference replays the same forwards on an uncompressed cache; each forward's queries may see what the
compressed cache held before that forward (recorded from `CompressedCache.kept_positions()`), plus what the
model's own mask allows among the forward's new tokens. For merging strategies the reference starts from
the compressed cache expanded to full length (merged states at their original positions).
"""

from __future__ import annotations

import copy

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvpress_mm.adapters import adapter_for
from kvpress_mm.backend import set_decoder_attention
from kvpress_mm.compressed_cache import CompressedLayer

# per-token inputs that a later turn extends with zeros (text tokens)
TOKEN_INPUTS = ("mm_token_type_ids", "token_type_ids")


def _cache_of(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


class HeldRecorder:
    """Records, after every forward of `model`, which original positions each compressed layer holds."""

    def __init__(self, model):
        self.model = model
        self.held: list[dict[int, torch.Tensor]] = []

    def __enter__(self):
        def hook(module, args, kwargs, output):
            cache = _cache_of(output)
            kept = cache.kept_positions() if hasattr(cache, "kept_positions") else {}
            self.held.append({i: k.clone() for i, k in kept.items()})

        self.handle = self.model.register_forward_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


_REF_NAME = "kvpress_mm_test_held_reference"
_STATE: dict = {"held": [], "forward": 0}


def _held_reference(module, query, key, value, attention_mask, **kwargs):
    f = _STATE["forward"]
    held_list = _STATE["held"]
    # past the recorded forwards the last record holds (positions after it are all held: nothing evicts)
    prev = held_list[min(f, len(held_list)) - 1].get(module.layer_idx) if f > 0 and held_list else None
    b, heads, q_len, s_len = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    if attention_mask is None:
        q_pos = torch.arange(s_len - q_len, s_len, device=key.device)[:, None]
        allowed = (torch.arange(s_len, device=key.device)[None, :] <= q_pos)[None, None].expand(b, 1, q_len, s_len)
    else:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if prev is not None:
        past = prev[..., : s_len - q_len]
        new = torch.ones((b, past.shape[1], s_len - past.shape[-1]), dtype=torch.bool, device=key.device)
        held = torch.cat([past.expand(b, -1, -1), new], dim=-1)[:, :, None, :]
        held = held.repeat_interleave(heads // held.shape[1], dim=1)
        allowed = allowed & held
    return sdpa_attention_forward(module, query, key, value, allowed, **kwargs)


AttentionInterface.register(_REF_NAME, _held_reference)
AttentionMaskInterface.register(_REF_NAME, sdpa_mask)


class HeldReference:
    """Inside: the decoder attends through `_held_reference`, forward f masked by held[f - 1 - offset]."""

    def __init__(self, model, held, first_forward: int = 0):
        self.model, self.held, self.first = model, held, first_forward

    def __enter__(self):
        self.decoder = adapter_for(self.model).decoder(self.model)
        self.original = self.decoder.config._attn_implementation
        _STATE["held"], _STATE["forward"] = self.held, self.first

        def count(module, args, kwargs, output):
            _STATE["forward"] += 1

        self.handle = self.model.register_forward_hook(count, with_kwargs=True)
        set_decoder_attention(self.model, self.decoder, _REF_NAME)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        set_decoder_attention(self.model, self.decoder, self.original)


def expanded(cache) -> DynamicCache:
    """The compressed cache at full logical length: each held state at its original position, zeros elsewhere."""
    ref = copy.deepcopy(cache)
    ref.__class__ = DynamicCache
    for i, layer in enumerate(ref.layers):
        if not isinstance(layer, CompressedLayer):
            continue
        state, physical = layer.state, layer.physical_length
        positions = state.current_positions(physical)
        real = state.allowed(physical, None, positions.device)
        b, h, _, d = layer.keys.shape
        total = layer.get_seq_length()
        positions = positions.expand(b, h, physical)
        if real is not None:  # padding slots go to a spare row, dropped below
            positions = positions.masked_fill(~real.expand(b, h, physical), total)
        full = []
        for states in (layer.keys, layer.values):
            out = torch.zeros((b, h, total + 1, d), dtype=states.dtype, device=states.device)
            out.scatter_(2, positions[..., None].expand(b, h, physical, d), states)
            full.append(out[:, :, :total])
        plain = DynamicLayer()
        plain.lazy_initialization(full[0], full[1])
        plain.keys, plain.values = full
        ref.layers[i] = plain
    return ref


def generate(model, inputs, steps, cache=None):
    out = model.generate(
        **inputs,
        cache=cache,
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits, dim=1).float(), out.past_key_values


def follow_up(inputs: dict, sequences: torch.Tensor, new_ids: torch.Tensor) -> dict:
    """The next turn's inputs the usual way: the whole history (prompt + answer) + the new ids, a full mask."""
    b, gen = sequences.shape[0], sequences.shape[1] - inputs["input_ids"].shape[1]
    ids = torch.cat([sequences, new_ids], dim=1)
    added = gen + new_ids.shape[1]
    mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones((b, added))], dim=1)
    out = {"input_ids": ids, "attention_mask": mask}
    for name in TOKEN_INPUTS:
        if name in inputs:
            out[name] = torch.cat([inputs[name], inputs[name].new_zeros((b, added))], dim=1)
    return out


def turn_ids(t, batch: int, length: int, seed: int) -> torch.Tensor:
    """Random text ids (no special or placeholder id) for a follow-up turn."""
    rows = t.make_inputs([[("text", length)]] * batch, seed=seed)
    return rows["input_ids"]
