"""Test helpers: cached tiny models and a masked full-cache reference computed without eviction."""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvpress_mm.adapters import adapter_for
from kvpress_mm.backend import set_decoder_attention
from kvpress_mm.testing import build_tiny

# rows used across tests: images at different positions per row, left padding in the shorter row
MIXED_ROWS = [
    [("text", 9), ("image",), ("text", 14), ("image",), ("text", 11)],
    [("image",), ("text", 17), ("text", 4)],
]
TEXT_ROWS = [[("text", 48)], [("text", 37)]]


# set from pytest's --device option (conftest.py)
DEVICE = torch.device("cpu")


@functools.cache
def tiny(family: str, dtype: torch.dtype = torch.float32):
    return build_tiny(family, dtype=dtype, device=DEVICE)


def rows_for(t, rows=None):
    if rows is None:
        rows = MIXED_ROWS if t.image_token_id is not None else TEXT_ROWS
    return rows


def generate(model, inputs, steps=6, **kw):
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True, **kw
    )
    return out.sequences, torch.stack(out.logits, dim=1).float()


# ---------------------------------------------------------------- masked reference
_REF_KEEP: dict[int, torch.Tensor] = {}
_REF_NAME = "kvpress_mm_test_masked_reference"


def _masked_reference(module, query, key, value, attention_mask, **kwargs):
    keep = _REF_KEEP.get(module.layer_idx)
    if keep is None or query.shape[2] == key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    b, heads, s_len = key.shape[0], query.shape[1], key.shape[2]
    prompt = keep.expand(b, keep.shape[1], keep.shape[2])
    new = torch.ones((b, keep.shape[1], s_len - keep.shape[2]), dtype=torch.bool, device=key.device)
    allowed = torch.cat([prompt, new], dim=-1)[:, :, None, :]
    allowed = allowed.repeat_interleave(heads // keep.shape[1], dim=1)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()
    return sdpa_attention_forward(module, query, key, value, allowed, **kwargs)


AttentionInterface.register(_REF_NAME, _masked_reference)
AttentionMaskInterface.register(_REF_NAME, sdpa_mask)


def masked_reference_generate(model, inputs, kept: dict[int, torch.Tensor], steps=6):
    """Generate with the full cache, masking for each layer the prompt positions `kept` says were evicted."""
    decoder = adapter_for(model).decoder(model)
    original = decoder.config._attn_implementation
    _REF_KEEP.clear()
    _REF_KEEP.update(kept)
    set_decoder_attention(model, decoder, _REF_NAME)
    try:
        return generate(model, inputs, steps)
    finally:
        set_decoder_attention(model, decoder, original)
        _REF_KEEP.clear()


# ---------------------------------------------------------------- head profiles (sparsemm needs one)
PROFILE_DIR = Path(tempfile.mkdtemp(prefix="kvpress-mm-test-profiles-"))


def profile_fields(name: str, identity) -> dict:
    """{"profile": path} of a random head profile for `identity` when strategy `name` reads one, else {}."""
    from kvpress_mm.head_profiles import HeadProfile
    from kvpress_mm.registry import strategy_class

    if "profile" not in {f.name for f in dataclasses.fields(strategy_class(name)[0])}:
        return {}
    m = identity
    path = PROFILE_DIR / f"{m.model_type}-{m.num_layers}-{m.num_kv_heads}-{m.num_query_heads}.json"
    if not path.exists():
        gen = torch.Generator().manual_seed(0)
        scores = torch.rand(m.num_layers, m.num_query_heads, generator=gen, dtype=torch.float64) ** 4
        HeadProfile(identity, scores).save(path)
    return {"profile": str(path)}


def run_cli(args, capsys) -> tuple[int, str, str]:
    """kvpress_mm.cli.main(args) in this process: (exit status, stdout, stderr)."""
    from kvpress_mm.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def parameters_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
