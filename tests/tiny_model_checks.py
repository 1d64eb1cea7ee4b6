"""The checks of the tiny builders (kvpress_mm.testing), run on every family by test_tiny_models_a.py and
test_tiny_models_b.py, each on half of TINY_FAMILIES (two files run in parallel).

Nothing here names a family: what differs between families is read from the TinyModel (text-only:
image_token_id is None; supports_video; per_row_pixels) and from its config (M-RoPE sections, sliding-window
layers). A check that needs one of those runs on the families that have it (`@only`); a new family
(one module in kvpress_mm.testing) is checked with no list to edit.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

from kvpress_mm.testing import build_tiny

torch.set_num_threads(1)

NEW_TOKENS = 5


@functools.cache
def _tiny(family: str, dtype: torch.dtype = torch.float32):
    return build_tiny(family, dtype=dtype, seed=0)


def _text_only(tm) -> bool:
    return tm.image_token_id is None


def _mrope(tm) -> bool:
    """Qwen-VL's multimodal rotary positions: rope sections per (temporal, height, width)."""
    return "mrope_section" in (getattr(tm.model.config.get_text_config(), "rope_parameters", None) or {})


def _sliding(tm) -> bool:
    return "sliding_attention" in (getattr(tm.model.config.get_text_config(), "layer_types", None) or ())


def only(predicate):
    """Run the check only on the families whose TinyModel satisfies `predicate`."""

    def mark(fn):
        fn.family_filter = predicate
        return fn

    return mark


def pytest_generate_tests(metafunc):
    """Each check over the calling file's FAMILIES (those its `@only` predicate accepts)."""
    if "family" not in metafunc.fixturenames:
        return
    families = list(metafunc.module.FAMILIES)
    keep = getattr(metafunc.function, "family_filter", None)
    if keep is not None:
        families = [f for f in families if keep(_tiny(f))]
    if families:
        metafunc.parametrize("family", families)
    else:
        skip = pytest.mark.skip(reason=f"no family of {metafunc.module.__name__} has what this check needs")
        metafunc.parametrize("family", [pytest.param(None, marks=skip)])


def _layers(tm):
    """The decoder layers of the language model."""
    inner = tm.model.model
    for name in ("language_model", "text_model"):
        if hasattr(inner, name):
            return getattr(inner, name).layers
    return inner.layers


def _rows(tm):
    """Row 0 is the shortest (it gets left padding); rows hold different numbers of images at different places."""
    if _text_only(tm):
        return [[("text", 6)], [("text", 9), ("text", 4)]]
    rows = [
        [("text", 3), ("image",), ("text", 4)],
        [("image",), ("text", 2), ("image",), ("text", 9)],
    ]
    if tm.supports_video:
        rows.append([("text", 2), ("video",), ("text", 3), ("image",), ("text", 12)])
    return rows


def _count(rows, kind):
    return [sum(seg[0] == kind for seg in row) for row in rows]


def _special_ids(tm) -> set[int]:
    """Every id of the family that is not a text token: placeholders, markers, bos / eos / pad."""
    ids = {tm.image_token_id, tm.video_token_id}
    for key, value in tm.extra.items():
        if key.endswith("token_id"):
            ids.add(value)
        elif key.endswith("token_ids"):
            ids.update(value)
    return {i for i in ids if i is not None}


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
    attn = _layers(tm)[0].self_attn
    assert attn.k_proj.out_features == 2 * 16 and attn.q_proj.out_features == 4 * 16
    if _text_only(tm):
        assert tm.image_token_id is None and tm.tokens_per_image == 0
        assert not tm.supports_video and tm.per_row_pixels == ()
    else:
        assert m.config.image_token_id == tm.image_token_id
        assert 4 <= tm.tokens_per_image <= 16
        assert m.config.vision_config._attn_implementation == "sdpa"
    # the flag says what the model takes: a video placeholder of its own
    assert tm.supports_video == (getattr(m.config, "video_token_id", None) is not None)
    if tm.supports_video:
        assert m.config.video_token_id == tm.video_token_id != tm.image_token_id
    if _mrope(tm):
        # M-RoPE split must cover head_dim / 2 rotary frequencies
        assert sum(cfg.rope_parameters["mrope_section"]) == 16 // 2
    if _sliding(tm):
        assert cfg.layer_types.count("sliding_attention") >= 2
        assert 1 <= cfg.layer_types.count("full_attention") <= 2
        assert 8 <= cfg.sliding_window <= 16


def test_deterministic_from_seed(family):
    again, other = build_tiny(family, seed=0).model, build_tiny(family, seed=1).model
    a = again.state_dict()
    b = _tiny(family).model.state_dict()
    c = other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    params = dict(_tiny(family).model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in again.named_parameters())
    assert any(not torch.equal(params[n], p) for n, p in other.named_parameters())
    tm = _tiny(family)
    x, y = tm.make_inputs(_rows(tm), seed=3), tm.make_inputs(_rows(tm), seed=3)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_input_layout(family):
    tm = _tiny(family)
    rows = _rows(tm)
    inp = tm.make_inputs(rows, seed=0)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    pad = tm.model.generation_config.pad_token_id
    assert pad == tm.extra["pad_token_id"]
    assert ids.shape == mask.shape and ids.shape[0] == len(rows)
    # left padding only, pad id there
    assert (mask.diff(dim=1) >= 0).all() and mask[:, -1].all()
    assert mask[0].sum() < ids.shape[1]  # row 0 really is padded
    assert (ids[mask == 0] == pad).all()
    # text ids never collide with special ids
    lo, hi = tm.extra["text_id_range"]
    specials = {v for k, v in tm.extra.items() if k.endswith("token_id")} | {tm.image_token_id, tm.video_token_id}
    assert all(not (lo <= s < hi) for s in specials if s is not None)
    if _text_only(tm):
        assert set(inp) == {"input_ids", "attention_mask"}
        return
    n_img, n_vid = _count(rows, "image"), _count(rows, "video")
    per_row_img = (ids == tm.image_token_id).sum(1).tolist()
    assert per_row_img == [n * tm.tokens_per_image for n in n_img]
    assert (ids[mask == 0] != tm.image_token_id).all()
    if tm.supports_video:
        per_row_vid = (ids == tm.video_token_id).sum(1).tolist()
        assert per_row_vid == [n * tm.extra["tokens_per_video"] for n in n_vid]
    for key in tm.per_row_pixels:  # [B, most images of a row, ...]
        assert inp[key].shape[0] == len(rows)

    x = tm.extra
    if _mrope(tm):
        assert (ids == x["vision_start_token_id"]).sum(1).tolist() == [i + v for i, v in zip(n_img, n_vid)]
        assert (ids == x["vision_end_token_id"]).sum(1).tolist() == [i + v for i, v in zip(n_img, n_vid)]
        tt = inp["mm_token_type_ids"]
        assert torch.equal(tt == 1, ids == tm.image_token_id) and torch.equal(tt == 2, ids == tm.video_token_id)
        assert inp["image_grid_thw"].shape == (sum(n_img), 3)
        merge = tm.model.config.vision_config.spatial_merge_size
        assert (inp["image_grid_thw"].prod(-1) // merge**2 == tm.tokens_per_image).all()
        assert inp["pixel_values"].shape[0] == inp["image_grid_thw"].prod(-1).sum()
        assert inp["pixel_values_videos"].shape[0] == inp["video_grid_thw"].prod(-1).sum()
        # given exactly where the model takes it (Qwen2.5-VL)
        takes = "second_per_grid_ts" in inspect.signature(tm.model.forward).parameters
        assert ("second_per_grid_ts" in inp) == takes
        # each placeholder run is wrapped by <vision_start> ... <vision_end>
        row = ids[1][mask[1].bool()].tolist()
        k = row.index(tm.image_token_id)
        assert row[k - 1] == x["vision_start_token_id"] and row[k + tm.tokens_per_image] == x["vision_end_token_id"]
    elif "boi_token_id" in x:  # Gemma3: <start_of_image> ... <end_of_image>, bidirectional image attention
        assert torch.equal(inp["token_type_ids"] == 1, ids == tm.image_token_id)
        assert inp["pixel_values"].shape[0] == sum(n_img)
        assert (ids == x["boi_token_id"]).sum(1).tolist() == n_img
        assert (ids == x["eoi_token_id"]).sum(1).tolist() == n_img
        row = ids[1][mask[1].bool()].tolist()
        k = row.index(tm.image_token_id)
        assert row[k - 1] == x["boi_token_id"] and row[k + tm.tokens_per_image] == x["eoi_token_id"]
    elif "sub_images_per_image" in x:  # Idefics3 / SmolVLM: sub-images per row, padded with all-zero images
        subs = x["sub_images_per_image"]
        assert tm.tokens_per_image == subs * x["image_seq_len"]
        assert tm.per_row_pixels == ("pixel_values", "pixel_attention_mask")
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
        grid_rows, grid_cols = x["split_grid"]
        # image splitting on (idefics3): rows x cols crops + the global image; off (smolvlm): the image alone
        assert subs == (grid_rows * grid_cols + 1 if grid_rows * grid_cols else 1)
    else:  # one pixel tensor per image, nothing around the placeholders
        assert tm.per_row_pixels == ()
        assert set(ids[mask.bool()].tolist()) - set(range(lo, hi)) <= _special_ids(tm)


def test_forward_generate_batch(family):
    tm = _tiny(family)
    rows = _rows(tm)
    inputs = tm.make_inputs(rows, seed=0)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, L = ids.shape
    assert B == len(rows)
    lengths = [sum(s[1] if s[0] == "text" else 0 for s in row) for row in rows]
    n_img, n_vid = sum(_count(rows, "image")), sum(_count(rows, "video"))

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
    for tok in _special_ids(tm):
        special &= ids != tok
    low, high = tm.extra["text_id_range"]
    text_ids = ids[special]
    assert text_ids.numel() == sum(lengths)
    assert ((text_ids >= low) & (text_ids < high)).all()

    with torch.no_grad():
        out = tm.model(**inputs)
    vocab = tm.model.config.get_text_config().vocab_size
    assert out.logits.shape == (B, L, vocab)
    assert not torch.isnan(out.logits).any()
    assert torch.isfinite(out.logits[mask.bool()]).all()
    assert torch.isfinite(out.logits).all()

    with torch.no_grad():
        gen = tm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert gen.shape == (B, L + NEW_TOKENS)
    assert torch.equal(gen[:, :L], ids)


def test_left_padding_matches_unpadded(family):
    """Row 0 of a left-padded batch == the same row alone (no padding): every logit, and greedy tokens."""
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


@only(lambda tm: not _text_only(tm))
def test_pixels_are_used(family):
    """Random pixels really flow into the LM (no zero-initialised projector hiding the vision path)."""
    tm = _tiny(family)
    inputs = tm.make_inputs(_rows(tm), seed=0)
    keys = [k for k in ("pixel_values", "pixel_values_videos") if k in inputs]
    assert "pixel_values" in keys and (not tm.supports_video or "pixel_values_videos" in keys)
    assert keys == ["pixel_values"] + (["pixel_values_videos"] if tm.supports_video else [])
    with torch.no_grad():
        ref = tm.model(**inputs).logits[:, -1]
        for key in keys:
            changed = dict(inputs)
            pv = inputs[key]
            changed[key] = torch.where(pv != 0, pv + 1.0, pv)  # keep per-row padding images all-zero
            moved = tm.model(**changed).logits[:, -1]
            assert not torch.allclose(moved, ref, atol=1e-5)
            assert (moved - ref).abs().max() > 1e-3, key


@only(lambda tm: not _text_only(tm))
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
        assert logits.dtype == dtype
        assert torch.isfinite(logits[mask]).all()
        assert torch.isfinite(logits).all()
        gen = tm.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert gen.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    # bf16/fp16 weights are the rounded fp32 weights: logits close to the fp32 model's
    ref = _tiny(family).model
    ref_inputs = tm.make_inputs(_rows(tm), seed=0)
    ref_inputs = {k: (v.float() if v.is_floating_point() else v) for k, v in ref_inputs.items()}
    with torch.no_grad():
        ref_logits = ref(**ref_inputs).logits
    torch.testing.assert_close(logits[mask].float(), ref_logits[mask], atol=0.1, rtol=0)
    assert (logits.float() - ref_logits)[:, -1].abs().max() < 0.1


@only(lambda tm: tm.supports_video)
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


@only(_mrope)
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


@only(_mrope)
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


@only(_sliding)
def test_gemma3_sliding_cache(family):
    """Sliding-window layers keep only their window of a prompt longer than it; full layers keep it all."""
    tm = _tiny(family)
    cfg = tm.model.config.get_text_config()
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
