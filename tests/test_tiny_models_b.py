"""Tiny builders: qwen2_vl, qwen2_5_vl (image + video), gemma3 (sliding + full layers), idefics3, smolvlm."""

from __future__ import annotations

import functools

import pytest
import torch

from kvpress_mm.testing import TINY_FAMILIES, build_tiny

torch.set_num_threads(1)

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm"]
QWEN = {"qwen2_vl", "qwen2_5_vl"}
NEW_TOKENS = 5


def test_the_two_files_cover_every_family():
    """test_tiny_models_a.py and this file split the families between them (two files run in parallel); their
    assertions are family-specific, so a new family (kvpress_mm.testing) is added to one of the lists by hand."""
    import test_tiny_models_a

    assert not set(test_tiny_models_a.FAMILIES) & set(FAMILIES)
    assert sorted(test_tiny_models_a.FAMILIES + FAMILIES) == sorted(TINY_FAMILIES)


@functools.cache
def _tiny(family: str, dtype: torch.dtype = torch.float32):
    return build_tiny(family, dtype=dtype, seed=0)


def _layers(tm):
    if tm.family in ("idefics3", "smolvlm"):
        return tm.model.model.text_model.layers
    return tm.model.model.language_model.layers


def _rows(tm):
    """Row 0 is the shortest (it gets left padding); rows hold different numbers of images at different places."""
    rows = [
        [("text", 3), ("image",), ("text", 4)],
        [("image",), ("text", 2), ("image",), ("text", 9)],
    ]
    if tm.supports_video:
        rows.append([("text", 2), ("video",), ("text", 3), ("image",), ("text", 12)])
    return rows


def _count(rows, kind):
    return [sum(seg[0] == kind for seg in row) for row in rows]


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
    assert getattr(cfg, "head_dim", None) in (None, 16)
    assert cfg.hidden_size // cfg.num_attention_heads == 16
    assert cfg.max_position_embeddings >= 4096
    assert 300 <= cfg.vocab_size <= 1000
    assert m.config._attn_implementation == "sdpa"
    assert cfg._attn_implementation == "sdpa"
    assert m.config.vision_config._attn_implementation == "sdpa"
    attn = _layers(tm)[0].self_attn
    assert attn.q_proj.out_features == 4 * 16 and attn.k_proj.out_features == 2 * 16
    assert m.config.image_token_id == tm.image_token_id
    assert 4 <= tm.tokens_per_image <= 16
    assert tm.supports_video == (family in QWEN)
    if tm.supports_video:
        assert m.config.video_token_id == tm.video_token_id != tm.image_token_id
    if family in QWEN:
        # M-RoPE split must cover head_dim / 2 rotary frequencies
        assert sum(cfg.rope_parameters["mrope_section"]) == 16 // 2
    if family == "gemma3":
        assert cfg.layer_types.count("sliding_attention") >= 2
        assert 1 <= cfg.layer_types.count("full_attention") <= 2
        assert 8 <= cfg.sliding_window <= 16


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_from_seed(family):
    a = dict(_tiny(family).model.named_parameters())
    b = build_tiny(family, seed=0).model
    c = build_tiny(family, seed=1).model
    assert all(torch.equal(a[n], p) for n, p in b.named_parameters())
    assert any(not torch.equal(a[n], p) for n, p in c.named_parameters())
    tm = _tiny(family)
    x, y = tm.make_inputs(_rows(tm), seed=3), tm.make_inputs(_rows(tm), seed=3)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("family", FAMILIES)
def test_input_layout(family):
    tm = _tiny(family)
    rows = _rows(tm)
    inp = tm.make_inputs(rows, seed=0)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    pad = tm.model.generation_config.pad_token_id
    assert ids.shape == mask.shape and ids.shape[0] == len(rows)
    # left padding only, pad id there
    assert (mask.diff(dim=1) >= 0).all() and mask[:, -1].all()
    assert mask[0].sum() < ids.shape[1]  # row 0 really is padded
    assert (ids[mask == 0] == pad).all()
    n_img, n_vid = _count(rows, "image"), _count(rows, "video")
    per_row_img = (ids == tm.image_token_id).sum(1).tolist()
    assert per_row_img == [n * tm.tokens_per_image for n in n_img]
    assert (ids[mask == 0] != tm.image_token_id).all()
    if tm.supports_video:
        per_row_vid = (ids == tm.video_token_id).sum(1).tolist()
        assert per_row_vid == [n * tm.extra["tokens_per_video"] for n in n_vid]
    # text ids never collide with special ids
    lo, hi = tm.extra["text_id_range"]
    specials = {v for k, v in tm.extra.items() if k.endswith("token_id")} | {tm.image_token_id, tm.video_token_id}
    assert all(not (lo <= s < hi) for s in specials if s is not None)

    if family in QWEN:
        x = tm.extra
        assert (ids == x["vision_start_token_id"]).sum(1).tolist() == [i + v for i, v in zip(n_img, n_vid)]
        assert (ids == x["vision_end_token_id"]).sum(1).tolist() == [i + v for i, v in zip(n_img, n_vid)]
        tt = inp["mm_token_type_ids"]
        assert torch.equal(tt == 1, ids == tm.image_token_id) and torch.equal(tt == 2, ids == tm.video_token_id)
        assert inp["image_grid_thw"].shape == (sum(n_img), 3)
        merge = tm.model.config.vision_config.spatial_merge_size
        assert (inp["image_grid_thw"].prod(-1) // merge**2 == tm.tokens_per_image).all()
        assert inp["pixel_values"].shape[0] == inp["image_grid_thw"].prod(-1).sum()
        assert inp["pixel_values_videos"].shape[0] == inp["video_grid_thw"].prod(-1).sum()
        assert ("second_per_grid_ts" in inp) == (family == "qwen2_5_vl")
        # each placeholder run is wrapped by <vision_start> ... <vision_end>
        row = ids[1][mask[1].bool()].tolist()
        k = row.index(tm.image_token_id)
        assert row[k - 1] == x["vision_start_token_id"] and row[k + tm.tokens_per_image] == x["vision_end_token_id"]
    elif family == "gemma3":
        assert torch.equal(inp["token_type_ids"] == 1, ids == tm.image_token_id)
        assert inp["pixel_values"].shape[0] == sum(n_img)
        assert (ids == tm.extra["boi_token_id"]).sum(1).tolist() == n_img
        assert (ids == tm.extra["eoi_token_id"]).sum(1).tolist() == n_img
        row = ids[1][mask[1].bool()].tolist()
        k = row.index(tm.image_token_id)
        assert row[k - 1] == tm.extra["boi_token_id"] and row[k + tm.tokens_per_image] == tm.extra["eoi_token_id"]
    else:
        x = tm.extra
        subs = x["sub_images_per_image"]
        assert tm.tokens_per_image == subs * x["image_seq_len"]
        pv, pam = inp["pixel_values"], inp["pixel_attention_mask"]
        assert pv.shape[:2] == (len(rows), max(n_img) * subs) and pam.shape[:2] == pv.shape[:2]
        real = (pv != 0).flatten(2).any(-1)
        assert real.sum(1).tolist() == [n * subs for n in n_img]
        assert torch.equal(pam.flatten(2).any(-1), real)
        # one <fake_token_around_image> before each sub-image + one closing the global image
        assert (ids == x["fake_image_token_id"]).sum(1).tolist() == [n * (subs + 1) for n in n_img]
        assert (ids == x["global_image_token_id"]).sum(1).tolist() == n_img
        n_rowcol = torch.isin(ids, torch.tensor(x["row_col_token_ids"])).sum(1).tolist()
        assert n_rowcol == [n * (subs - 1) for n in n_img]
        if family == "idefics3":
            assert subs == 3  # image splitting on: 1x2 crops + global image
        else:
            assert subs == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_generate_batch(family):
    tm = _tiny(family)
    inputs = tm.make_inputs(_rows(tm), seed=0)
    ids = inputs["input_ids"]
    with torch.no_grad():
        logits = tm.model(**inputs).logits
    assert logits.shape == (*ids.shape, tm.model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    out = tm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS)
    assert torch.equal(out[:, : ids.shape[1]], ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_matches_single_row(family):
    """Row 0 of a left-padded batch == the same row alone (no padding): last-token logits and greedy tokens."""
    tm = _tiny(family)
    rows = _rows(tm)
    batch, single = tm.make_inputs(rows, seed=0), tm.make_inputs(rows[:1], seed=0)
    n = single["input_ids"].shape[1]
    assert batch["attention_mask"][0].sum() == n < batch["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, -n:], single["input_ids"][0])
    with torch.no_grad():
        lb = tm.model(**batch).logits[0, -1]
        ls = tm.model(**single).logits[0, -1]
    torch.testing.assert_close(lb, ls, atol=1e-4, rtol=0)
    gb = tm.model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    gs = tm.model.generate(**single, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(gb[0, -NEW_TOKENS:], gs[0, -NEW_TOKENS:])


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_inputs_matter(family):
    """Random pixels really flow into the LM (no zero-initialised projector hiding the vision path)."""
    tm = _tiny(family)
    inputs = tm.make_inputs(_rows(tm), seed=0)
    keys = ["pixel_values"] + (["pixel_values_videos"] if tm.supports_video else [])
    with torch.no_grad():
        base = tm.model(**inputs).logits[:, -1]
        for key in keys:
            moved = dict(inputs)
            pv = inputs[key]
            moved[key] = torch.where(pv != 0, pv + 1.0, pv)  # keep Idefics3 padding images all-zero
            assert (tm.model(**moved).logits[:, -1] - base).abs().max() > 1e-3, key


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_image_counts(family):
    """A text-only row next to an image row; a text-only batch."""
    tm = _tiny(family)
    rows = [[("text", 5)], [("text", 2), ("image",), ("text", 1)]]
    inputs = tm.make_inputs(rows, seed=1)
    assert (inputs["input_ids"] == tm.image_token_id).sum(1).tolist() == [0, tm.tokens_per_image]
    with torch.no_grad():
        assert torch.isfinite(tm.model(**inputs).logits).all()
    text_only = tm.make_inputs([[("text", 4)], [("text", 7)]], seed=1)
    assert "pixel_values" not in text_only
    out = tm.model.generate(**text_only, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, 9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
def test_low_precision(family, dtype):
    tm = build_tiny(family, dtype=dtype, seed=0)
    assert tm.model.dtype == dtype
    inputs = tm.make_inputs(_rows(tm), seed=0)
    with torch.no_grad():
        logits = tm.model(**inputs).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    ref = _tiny(family)
    with torch.no_grad():
        ref_logits = ref.model(**ref.make_inputs(_rows(ref), seed=0)).logits
    # same weights (fp32 init, then cast): low-precision logits stay close to fp32
    assert (logits.float() - ref_logits)[:, -1].abs().max() < 0.1
    if dtype == torch.bfloat16:
        out = tm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS


@pytest.mark.parametrize("family", sorted(QWEN))
def test_qwen_mrope_positions_with_left_padding(family):
    tm = _tiny(family)
    rows = _rows(tm)
    batch, single = tm.make_inputs(rows, seed=0), tm.make_inputs(rows[:1], seed=0)
    kw = lambda inp: {k: v for k, v in inp.items() if k not in ("pixel_values", "pixel_values_videos")}  # noqa: E731
    pos_b, delta_b = tm.model.model.get_rope_index(**kw(batch))
    pos_s, delta_s = tm.model.model.get_rope_index(**kw(single))
    n = single["input_ids"].shape[1]
    assert pos_b.shape == (3, len(rows), batch["input_ids"].shape[1])
    assert torch.equal(pos_b[:, 0, -n:], pos_s[:, 0]) and delta_b[0] == delta_s[0]
    # image block: temporal index constant, height/width span the merged grid; text resumes after max(h, w)
    ids = single["input_ids"][0]
    img = (ids == tm.image_token_id).nonzero().flatten()
    t, h, w = tm.extra["image_grid_thw"]
    merge = tm.model.config.vision_config.spatial_merge_size
    p = pos_s[:, 0, img]
    assert p[0].unique().numel() == 1
    assert p[1].max() - p[1].min() == h // merge - 1 and p[2].max() - p[2].min() == w // merge - 1
    after = img[-1] + 1  # <vision_end>
    assert (pos_s[:, 0, after] == p[0, 0] + max(h, w) // merge).all()
    # the video block in row 2 uses temporal positions too
    vid = (batch["input_ids"][2] == tm.video_token_id).nonzero().flatten()
    assert pos_b[0, 2, vid].unique().numel() == tm.extra["video_grid_thw"][0]


@pytest.mark.parametrize("family", sorted(QWEN))
def test_qwen_left_padded_video_row(family):
    """A padded row holding a video and an image matches the same row alone (M-RoPE temporal positions)."""
    tm = _tiny(family)
    rows = [
        [("text", 2), ("video",), ("text", 3), ("image",), ("text", 1)],
        [("image",), ("text", 2), ("image",), ("video",), ("text", 19)],
    ]
    batch, single = tm.make_inputs(rows, seed=0), tm.make_inputs(rows[:1], seed=0)
    assert batch["attention_mask"][0].sum() < batch["input_ids"].shape[1]
    with torch.no_grad():
        lb = tm.model(**batch).logits[0, -1]
        ls = tm.model(**single).logits[0, -1]
    torch.testing.assert_close(lb, ls, atol=1e-4, rtol=0)
    gb = tm.model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    gs = tm.model.generate(**single, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(gb[0, -NEW_TOKENS:], gs[0, -NEW_TOKENS:])


def test_gemma3_sliding_cache():
    tm = _tiny("gemma3")
    cfg = tm.model.config.text_config
    inputs = tm.make_inputs([[("text", 3), ("image",), ("text", 20)]], seed=0)
    length = inputs["input_ids"].shape[1]
    assert length > cfg.sliding_window
    with torch.no_grad():
        cache = tm.model(**inputs, use_cache=True).cache
    for layer_type, layer in zip(cfg.layer_types, cache.layers):
        if layer_type == "sliding_attention":
            assert layer.keys.shape[2] < length  # sliding layers keep only the window
        else:
            assert layer.keys.shape[2] == length
