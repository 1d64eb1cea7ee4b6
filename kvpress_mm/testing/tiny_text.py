"""Tiny random-weight text-only models ("llama", "qwen2") and helpers shared by the multimodal builders.

Vocabulary layout used by every builder in this module, tiny_llava.py and tiny_internvl.py:

    0                      pad
    1                      bos
    2                      eos
    [3, VOCAB_SIZE - 8)    ordinary text tokens (what ("text", n) segments draw from)
    VOCAB_SIZE - 2         video placeholder (families with video)
    VOCAB_SIZE - 1         image placeholder (multimodal families)

Rows are built exactly from their segments (no bos is prepended), so a row's length is the sum of its
segment lengths. Generation never stops early: `generation_config.eos_token_id` is None, so
`generate(..., max_new_tokens=k)` always returns `[B, L + k]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .tiny import Row, TinyModel, left_pad, tiny_builder

VOCAB_SIZE = 512
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
TEXT_ID_RANGE = (3, VOCAB_SIZE - 8)  # [low, high)
VIDEO_TOKEN_ID = VOCAB_SIZE - 2
IMAGE_TOKEN_ID = VOCAB_SIZE - 1

# Random init (std 0.02) gives almost uniform attention, which makes score-based KV eviction meaningless.
# Scaling the query/key projections makes attention peaked (per-head score std of a few units), like a
# trained model, while keeping every dtype finite.
QK_SCALE = 8.0


def text_config_kwargs(**overrides) -> dict:
    """Common kwargs of the tiny decoder (Llama / Qwen2 style config): GQA 4 query heads / 2 kv heads."""
    kw = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return kw


def sharpen_attention(layers, scale: float = QK_SCALE) -> None:
    """Scale q_proj / k_proj of every decoder layer in place (weights and biases)."""
    with torch.no_grad():
        for layer in layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.mul_(scale)
                if proj.bias is not None:
                    proj.bias.mul_(scale)


def finalize_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to dtype, set eval mode, keep config dtypes in sync, make generation deterministic in length."""
    model = model.to(dtype).eval()
    cfg = model.config
    cfg.dtype = dtype
    for key in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, key, None)
        if sub is not None:
            sub.dtype = dtype
    gc = model.generation_config
    gc.pad_token_id = PAD_ID
    gc.bos_token_id = BOS_ID
    gc.eos_token_id = None  # never stop early: generate always yields max_new_tokens tokens
    gc.do_sample = False
    return model


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def random_text_ids(gen: torch.Generator, n: int) -> torch.Tensor:
    low, high = TEXT_ID_RANGE
    return torch.randint(low, high, (n,), generator=gen, dtype=torch.long)


def build_rows(
    rows: list[Row],
    seed: int,
    segment_handlers: dict[str, Callable[[torch.Generator, tuple], torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """Turn rows of segments into left-padded ids / mask.

    `segment_handlers[kind](gen, segment)` returns the 1-D ids of a non-text segment (and records whatever
    pixels it needs as a side effect, in row-major order). Returns (input_ids, attention_mask, generator).
    """
    gen = torch.Generator().manual_seed(seed)
    rows_ids = []
    for row in rows:
        pieces = []
        for seg in row:
            kind = seg[0]
            if kind == "text":
                pieces.append(random_text_ids(gen, int(seg[1])))
            elif kind in segment_handlers:
                pieces.append(segment_handlers[kind](gen, seg))
            else:
                raise ValueError(f"unsupported segment {seg!r} (supported: text, {', '.join(segment_handlers)})")
        if not pieces:
            raise ValueError("empty row")
        rows_ids.append(torch.cat(pieces))
    input_ids, attention_mask = left_pad(rows_ids, PAD_ID)
    return input_ids, attention_mask, gen


def common_extra(**more) -> dict:
    extra = dict(
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        text_id_range=TEXT_ID_RANGE,
        vocab_size=VOCAB_SIZE,
    )
    extra.update(more)
    return extra


def _build_text(family: str, config_cls, model_cls, dtype: torch.dtype, seed: int, **cfg_overrides) -> TinyModel:
    config = config_cls(**text_config_kwargs(**cfg_overrides))
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    sharpen_attention(model.model.layers)
    model = finalize_model(model, dtype)

    def make_inputs(rows: list[Row], seed: int = 0) -> dict:
        input_ids, attention_mask, _ = build_rows(rows, seed, {})
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    return TinyModel(family=family, model=model, make_inputs=make_inputs, extra=common_extra())


@tiny_builder("llama")
def build_llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build_text("llama", LlamaConfig, LlamaForCausalLM, dtype, seed, head_dim=16)


@tiny_builder("qwen2")
def build_qwen2(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Qwen2 derives head_dim = hidden_size // num_attention_heads = 16; q/k/v projections carry biases.
    return _build_text("qwen2", Qwen2Config, Qwen2ForCausalLM, dtype, seed)
