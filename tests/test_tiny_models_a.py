"""Tiny builders: llama, qwen2 (text) and llava, llava_next, llava_onevision, internvl (multimodal)."""

from __future__ import annotations

import functools

import pytest
import torch

from kvpress_mm.testing import build_tiny

torch.set_num_threads(1)

FAMILIES = ["llama", "qwen2", "llava", "llava_next", "llava_onevision", "internvl"]
TEXT_FAMILIES = {"llama", "qwen2"}
NEW_TOKENS = 5


@functools.cache
def _tiny(family: str, dtype: torch.dtype = torch.float32):
    return build_tiny(family, dtype=dtype, seed=0)


def _rows(tm):
    """Row 0 is the shorter one (it gets left padding); images sit at different positions in each row."""
    if tm.family in TEXT_FAMILIES:
        return [[("text", 6)], [("text", 9), ("text", 4)]]
    rows = [
        [("text", 3), ("image",), ("text", 4)],
        [("image",), ("text", 2), ("image",), ("text", 9)],
    ]
    if tm.supports_video:
        rows.append([("text", 2), ("video",), ("text", 3), ("image",), ("text", 12)])
    return rows


def _n_images(rows):
    return sum(seg[0] == "image" for row in rows for seg in row)


def _n_videos(rows):
    return sum(seg[0] == "video" for row in rows for seg in row)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_contract(family):
    tm = _tiny(family)
    m = tm.model
    assert tm.family == family
    assert not m.training
    assert m.dtype == torch.float32
    cfg = m.config.get_text_config()
    assert cfg.hidden_size == 64
    assert 2 <= cfg.num_hidden_layers <= 4
    assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    assert cfg.hidden_size // cfg.num_attention_heads == 16
    assert getattr(cfg, "head_dim", None) in (None, 16)
    assert cfg.max_position_embeddings >= 4096
    assert 300 <= cfg.vocab_size <= 1000
    assert m.config._attn_implementation == "sdpa"
    assert cfg._attn_implementation == "sdpa"
    attn = m.model.language_model.layers[0].self_attn if family not in TEXT_FAMILIES else m.model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * 16 and attn.q_proj.out_features == 4 * 16
    if family in TEXT_FAMILIES:
        assert tm.image_token_id is None and tm.tokens_per_image == 0
    else:
        assert m.config.image_token_id == tm.image_token_id
        assert 4 <= tm.tokens_per_image <= 16
        assert m.config.vision_config._attn_implementation == "sdpa"
    if tm.supports_video:
        assert m.config.video_token_id == tm.video_token_id
        assert tm.video_token_id != tm.image_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_generate_batch(family):
    tm = _tiny(family)
    rows = _rows(tm)
    inputs = tm.make_inputs(rows, seed=0)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, L = ids.shape
    assert B == len(rows)
    lengths = [sum(s[1] if s[0] == "text" else 0 for s in row) for row in rows]
    n_img, n_vid = _n_images(rows), _n_videos(rows)

    # left padding
    assert mask[0, 0] == 0 and mask[:, -1].all()
    assert (ids[mask == 0] == tm.extra["pad_token_id"]).all()
    # placeholder counts
    if tm.image_token_id is not None:
        assert int((ids == tm.image_token_id).sum()) == n_img * tm.tokens_per_image
        per_row = (ids == tm.image_token_id).sum(-1).tolist()
        assert per_row == [sum(s[0] == "image" for s in row) * tm.tokens_per_image for row in rows]
    if tm.supports_video:
        assert int((ids == tm.video_token_id).sum()) == n_vid * tm.extra["tokens_per_video"]
    # text tokens are never special
    special = mask.bool()
    for tok in (tm.image_token_id, tm.video_token_id):
        if tok is not None:
            special &= ids != tok
    low, high = tm.extra["text_id_range"]
    text_ids = ids[special]
    assert text_ids.numel() == sum(lengths)
    assert ((text_ids >= low) & (text_ids < high)).all()

    with torch.no_grad():
        out = tm.model(**inputs)
    assert out.logits.shape == (B, L, tm.model.config.get_text_config().vocab_size)
    assert not torch.isnan(out.logits).any()
    assert torch.isfinite(out.logits[mask.bool()]).all()

    with torch.no_grad():
        gen = tm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert gen.shape == (B, L + NEW_TOKENS)
    assert torch.equal(gen[:, :L], ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_matches_unpadded(family):
    tm = _tiny(family)
    rows = _rows(tm)
    batch = tm.make_inputs(rows, seed=3)
    single = tm.make_inputs(rows[:1], seed=3)
    n = single["input_ids"].shape[1]
    assert batch["attention_mask"][0].sum() == n < batch["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, -n:], single["input_ids"][0])
    with torch.no_grad():
        lb = tm.model(**batch).logits[0, -n:]
        ls = tm.model(**single).logits[0]
    torch.testing.assert_close(lb[-1], ls[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(lb, ls, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in TEXT_FAMILIES])
def test_pixels_are_used(family):
    tm = _tiny(family)
    inputs = tm.make_inputs(_rows(tm), seed=0)
    keys = [k for k in ("pixel_values", "pixel_values_videos") if k in inputs]
    assert "pixel_values" in keys and (not tm.supports_video or "pixel_values_videos" in keys)
    with torch.no_grad():
        ref = tm.model(**inputs).logits[:, -1]
        for key in keys:
            changed = dict(inputs)
            changed[key] = inputs[key] + 1.0
            assert not torch.allclose(tm.model(**changed).logits[:, -1], ref, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(family, dtype):
    tm = _tiny(family, dtype)
    assert tm.model.dtype == dtype
    inputs = tm.make_inputs(_rows(tm), seed=0)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            assert inputs[key].dtype == dtype
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        logits = tm.model(**inputs).logits
        assert torch.isfinite(logits[mask]).all()
        gen = tm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert gen.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    # bf16/fp16 weights are the rounded fp32 weights: logits close to the fp32 model's
    ref = _tiny(family).model
    ref_inputs = tm.make_inputs(_rows(tm), seed=0)
    ref_inputs = {k: (v.float() if v.is_floating_point() else v) for k, v in ref_inputs.items()}
    with torch.no_grad():
        ref_logits = ref(**ref_inputs).logits
    torch.testing.assert_close(logits[mask].float(), ref_logits[mask], atol=0.1, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_from_seed(family):
    a = build_tiny(family, seed=0).model.state_dict()
    b = _tiny(family).model.state_dict()
    c = build_tiny(family, seed=1).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("family", ["llava_onevision"])
def test_video_only_and_text_only_batches(family):
    tm = _tiny(family)
    for rows in ([[("video",), ("text", 4)], [("text", 2), ("video",)]], [[("text", 5)], [("text", 3)]]):
        inputs = tm.make_inputs(rows, seed=0)
        assert "pixel_values" not in inputs
        with torch.no_grad():
            out = tm.model(**inputs)
            gen = tm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert not torch.isnan(out.logits).any()
        assert gen.shape == (2, inputs["input_ids"].shape[1] + NEW_TOKENS)
