"""Chunked attention statistics against plain eager softmax probabilities."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_mm.attention_stats import accumulated_attention, attention_with_accumulated, window_attention


def _eager_probs(q, k, scale, allowed):
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0)


def _causal(length):
    return torch.ones(length, length, dtype=torch.bool).tril()[None, None]


@pytest.mark.parametrize("kv_heads,groups", [(1, 1), (2, 2), (1, 4)])
@pytest.mark.parametrize("length", [7, 130, 300])
def test_accumulated_matches_eager_causal(kv_heads, groups, length):
    torch.manual_seed(length)
    q = torch.randn(2, kv_heads * groups, length, 8) * 2
    k = torch.randn(2, kv_heads, length, 8) * 2
    v = torch.randn(2, kv_heads, length, 8)
    scale = 8**-0.5
    ref = _eager_probs(q, k, scale, _causal(length)).sum(2)
    torch.testing.assert_close(accumulated_attention(q, k, scale), ref, atol=1e-4, rtol=1e-4)
    out, accumulated = attention_with_accumulated(q, k, v, scale)
    torch.testing.assert_close(accumulated, ref, atol=1e-4, rtol=1e-4)
    ref_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 3]),
    length=st.integers(1, 200),
    head_dim=st.sampled_from([4, 16]),
    seed=st.integers(0, 2**16),
)
def test_one_pass_attention_matches_eager(batch, kv_heads, groups, length, head_dim, seed):
    """Output and per-key sums of the one-pass form against softmax(QK^T)V computed in full."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, length, head_dim, generator=gen) * 2
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen) * 2
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen)
    scale = head_dim**-0.5
    probs = _eager_probs(q, k, scale, _causal(length))
    out, accumulated = attention_with_accumulated(q, k, v, scale)
    torch.testing.assert_close(accumulated, probs.sum(2), atol=1e-4, rtol=1e-4)
    ref_out = probs @ v.repeat_interleave(groups, dim=1)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    assert out.shape == q.shape and accumulated.shape == (batch, kv_heads * groups, length)


def test_one_pass_declines_where_it_does_not_apply():
    q = torch.randn(1, 2, 5, 4)
    k = torch.randn(1, 2, 7, 4)  # keys from an earlier chunk: not a plain causal prefill
    assert attention_with_accumulated(q, k, k, 0.5) is None


def test_accumulated_with_padding_and_bidirectional_blocks():
    torch.manual_seed(0)
    length, pad = 40, 6
    q = torch.randn(2, 4, length, 8)
    k = torch.randn(2, 2, length, 8)
    allowed = _causal(length).repeat(2, 1, 1, 1)
    allowed[:, :, 10:20, 10:20] = True  # an image block attending both ways (Gemma3)
    allowed[1, :, :, :pad] = False  # left padding of row 1
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :pad] = False
    probs = _eager_probs(q, k, 0.3, allowed) * valid[:, None, :, None]
    got = accumulated_attention(q, k, 0.3, allowed=allowed, query_valid=valid)
    torch.testing.assert_close(got, probs.sum(2), atol=1e-5, rtol=1e-5)
    assert torch.all(got[1, :, :pad] == 0)
    float_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    from kvpress_mm.attention_stats import allowed_from_mask

    got2 = accumulated_attention(q, k, 0.3, allowed=allowed_from_mask(float_mask), query_valid=valid)
    torch.testing.assert_close(got2, got)


@pytest.mark.parametrize("window", [1, 5, 64])
def test_window_matches_eager(window):
    torch.manual_seed(window)
    length = 30
    q = torch.randn(1, 6, length, 4)
    k = torch.randn(1, 3, length, 4)
    probs = _eager_probs(q, k, 0.5, _causal(length))
    w = min(window, length)
    torch.testing.assert_close(window_attention(q, k, 0.5, window), probs[:, :, length - w :])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stats_in_low_precision_are_float32_and_finite(dtype):
    torch.manual_seed(1)
    q = (torch.randn(1, 4, 50, 16) * 3).to(dtype)
    k = (torch.randn(1, 2, 50, 16) * 3).to(dtype)
    v = torch.randn(1, 2, 50, 16).to(dtype)
    out, acc = attention_with_accumulated(q, k, v, 0.25)
    assert out.dtype == dtype and acc.dtype == torch.float32 and torch.isfinite(acc).all()
    ref_out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, scale=0.25, enable_gqa=True
    )
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    # every query distributes probability 1 over its keys: the total mass is the number of queries
    torch.testing.assert_close(acc.sum(-1), torch.full((1, 4), 50.0), atol=0.05, rtol=0)


@pytest.mark.parametrize("block", [None, (120, 140), (250, 290)])
def test_accumulated_under_a_mask_over_several_chunks(block):
    """Causal + left padding lets each 128-query chunk stop at its last query; a bidirectional block that
    crosses a chunk boundary must not be cut (keys after the chunk are seen)."""
    torch.manual_seed(3)
    length, pad = 300, 9
    q = torch.randn(2, 4, length, 8)
    k = torch.randn(2, 2, length, 8)
    allowed = _causal(length).repeat(2, 1, 1, 1)
    if block is not None:
        allowed[:, :, block[0] : block[1], block[0] : block[1]] = True
    allowed[1, :, :, :pad] = False
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :pad] = False
    probs = _eager_probs(q, k, 0.3, allowed) * valid[:, None, :, None]
    got = accumulated_attention(q, k, 0.3, allowed=allowed, query_valid=valid)
    torch.testing.assert_close(got, probs.sum(2), atol=1e-4, rtol=1e-5)


def _left_padded(pads, length):
    valid = torch.ones(len(pads), length, dtype=torch.bool)
    for row, pad in enumerate(pads):
        valid[row, :pad] = False
    return valid


@settings(max_examples=25, deadline=None)
@given(
    pads=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    kv_heads=st.integers(1, 2),
    groups=st.sampled_from([1, 3]),
    length=st.integers(1, 150),
    seed=st.integers(0, 2**16),
)
def test_one_pass_with_key_padding_matches_eager(pads, kv_heads, groups, length, seed):
    """Left-padded rows: real queries get softmax over real causal keys; padded ones give 0 and add nothing."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(pads)
    valid = _left_padded([min(p, length) for p in pads], length)
    q = torch.randn(batch, kv_heads * groups, length, 8, generator=gen) * 2
    k = torch.randn(batch, kv_heads, length, 8, generator=gen) * 2
    v = torch.randn(batch, kv_heads, length, 8, generator=gen)
    allowed = _causal(length) & valid[:, None, None, :]
    probs = _eager_probs(q, k, 0.3, allowed) * valid[:, None, :, None]
    out, accumulated = attention_with_accumulated(q, k, v, 0.3, key_valid=valid)
    torch.testing.assert_close(accumulated, probs.sum(2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, probs @ v.repeat_interleave(groups, dim=1), atol=1e-5, rtol=1e-4)
    assert torch.isfinite(out).all() and torch.all(out[~valid[:, None, :].expand(-1, q.shape[1], -1)] == 0)


def test_causal_with_key_padding_recognises_only_that_mask():
    from kvpress_mm.attention_stats import causal_with_key_padding

    length = 12
    valid = _left_padded([0, 5], length)
    mask = _causal(length) & valid[:, None, None, :]
    assert causal_with_key_padding(mask, valid)
    odd_pad_rows = mask.clone()
    odd_pad_rows[1, :, :5, :] = True  # what a model puts in padded query rows does not matter
    assert causal_with_key_padding(odd_pad_rows, valid)
    for change in ((slice(None), 3, 7), (1, 8, 2)):  # a real query seeing the future / losing a real key
        other = mask.clone()
        other[change[0], :, change[1], change[2]] = ~other[change[0], :, change[1], change[2]]
        assert not causal_with_key_padding(other, valid)
    assert not causal_with_key_padding(mask.expand(2, 3, length, length), valid)  # per-head masks
    assert not causal_with_key_padding(mask[..., :-1, :], valid)  # queries after cached keys
