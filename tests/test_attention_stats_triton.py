"""The CUDA kernels of H2O's per-key sums (kvpress_mm/attention_stats_triton.py) against the torch form.

On the CPU the kernels run in Triton's interpreter (a private copy of the module, loaded with
TRITON_INTERPRET=1); with `pytest --device cuda` the compiled kernels are checked on the GPU as well.
The torch form is itself checked against eager probabilities in test_attention_stats.py.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import helpers  # noqa: E402

from kvpress_mm.attention_stats import accumulated_attention, hides_future  # noqa: E402


@pytest.fixture(scope="module")
def interpreted():
    """attention_stats_triton with its kernels in Triton's interpreter (CPU tensors; conftest sets
    TRITON_INTERPRET=1 before Triton is imported when the tests run on the CPU)."""
    import triton.runtime.interpreter as interpreter

    from kvpress_mm import attention_stats_triton

    if type(attention_stats_triton._row_lse).__name__ != "InterpretedFunction":
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 (pytest --device cuda runs the compiled kernels)")
    patch = pytest.MonkeyPatch()
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is not None:
        # Triton <= 3.6's interpreter turns loop bounds into ints with int(array of shape (1,)), which numpy
        # >= 2.4 refuses (3.9 squeezes first); read the single element (interpreter only)
        def patched(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

        patch.setattr(interpreter, "_patch_lang_tensor", patched)
    yield attention_stats_triton
    patch.undo()


def _case(seed, batch, kv_heads, groups, length, extra_keys, head_dim, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, length, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, length + extra_keys, head_dim, generator=g).to(dtype)
    return q, k, head_dim**-0.5


def _padding_mask(batch, length, s_len, pads):
    valid = torch.ones(batch, s_len, dtype=torch.bool)
    for row, pad in enumerate(pads):
        valid[row, :pad] = False
    causal = torch.ones(length, s_len, dtype=torch.bool).tril(s_len - length)
    return (causal[None] & valid[:, None, :])[:, None], valid[:, s_len - length :]


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, 4]),
    length=st.integers(1, 150),
    extra_keys=st.sampled_from([0, 0, 5, 70]),
    head_dim=st.sampled_from([16, 40, 64, 256]),
)
def test_causal_sums_match_torch(interpreted, seed, kv_heads, groups, length, extra_keys, head_dim):
    q, k, scale = _case(seed, 1, kv_heads, groups, length, extra_keys, head_dim)
    torch.testing.assert_close(
        interpreted.accumulated_attention(q, k, scale), accumulated_attention(q, k, scale), atol=2e-5, rtol=1e-5
    )


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(2, 140), share=st.floats(0.0, 0.9), within=st.booleans())
def test_padded_batch_sums_match_torch(interpreted, seed, length, share, within):
    """Left padding: padded keys get nothing, padded queries add nothing; the causal block skipping under
    a mask (within_causal) gives the same sums as walking every block."""
    q, k, scale = _case(seed, 2, 2, 2, length, 0, 32)
    allowed, query_valid = _padding_mask(2, length, length, [int(share * length), 0])
    expected = accumulated_attention(q, k, scale, allowed, query_valid)
    got = interpreted.accumulated_attention(q, k, scale, allowed, query_valid, within_causal=within)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    pad = int(share * length)
    assert not bool(got[0, :, :pad].any()), "a padded key got attention"


def test_bidirectional_blocks_and_per_head_masks(interpreted):
    """Gemma3-like image blocks (queries see later keys of their block), a per-head mask and a query row
    that may see nothing at all."""
    q, k, scale = _case(3, 2, 1, 4, 130, 0, 64)
    allowed, query_valid = _padding_mask(2, 130, 130, [9, 0])
    allowed = allowed.clone()
    allowed[:, :, 40:100, 40:100] = True
    allowed[0, :, 0:9] = False
    per_head = allowed.expand(2, 4, 130, 130).clone()
    per_head[:, 1, :, 50:60] = False  # one head blind to a span
    assert not hides_future(allowed)
    for mask in (allowed, per_head):
        expected = accumulated_attention(q, k, scale, mask, query_valid)
        torch.testing.assert_close(
            interpreted.accumulated_attention(q, k, scale, mask, query_valid), expected, atol=2e-5, rtol=1e-5
        )


def test_half_precision_inputs(interpreted):
    """fp16 products, fp32 sums (bf16 is checked by test_compiled_kernels_on_cuda: the interpreter computes
    in numpy, which has no bfloat16)."""
    q, k, scale = _case(5, 1, 2, 2, 97, 3, 64, torch.float16)
    expected = accumulated_attention(q, k, scale)
    got = interpreted.accumulated_attention(q, k, scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)


def test_hides_future():
    allowed, _ = _padding_mask(2, 70, 70, [5, 0])
    assert hides_future(allowed)
    assert hides_future(allowed, chunk=16)
    window = allowed & torch.ones(70, 70, dtype=torch.bool).triu(-8)
    assert hides_future(window, chunk=16)
    with_offset, _ = _padding_mask(1, 30, 50, [0])  # 20 cached keys before the queries
    assert hides_future(with_offset, chunk=7)
    leaky = allowed.clone()
    leaky[1, 0, 33, 34] = True
    assert not hides_future(leaky, chunk=16)


@pytest.mark.skipif(helpers.DEVICE.type != "cuda", reason="compiled kernels: run with pytest --device cuda")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_on_cuda(monkeypatch, dtype):
    """The dispatcher takes the Triton kernels on CUDA; they match the torch form there (and the CPU)."""
    from kvpress_mm import attention_stats_triton

    calls = []
    original = attention_stats_triton.accumulated_attention
    monkeypatch.setattr(attention_stats_triton, "accumulated_attention", lambda *a: calls.append(1) or original(*a))
    for seed, length, pads in [(0, 1000, [0, 0]), (1, 777, [100, 0]), (2, 4096, [1000, 3])]:
        q, k, scale = _case(seed, 2, 2, 4, length, 0, 64, dtype)
        allowed, query_valid = _padding_mask(2, length, length, pads)
        if not any(pads):
            allowed = query_valid = None
        cpu = accumulated_attention(q, k, scale, allowed, query_valid)
        move = lambda t: None if t is None else t.to(helpers.DEVICE)
        got = accumulated_attention(
            *map(move, (q, k)), scale, move(allowed), move(query_valid), within_causal=allowed is not None
        ).cpu()
        monkeypatch.setenv("KVPRESS_MM_TRITON", "0")
        torch_cuda = accumulated_attention(*map(move, (q, k)), scale, move(allowed), move(query_valid)).cpu()
        monkeypatch.delenv("KVPRESS_MM_TRITON")
        tol = dict(atol=2e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=2e-2)
        torch.testing.assert_close(got, torch_cuda, **tol)
        torch.testing.assert_close(got, cpu, **tol)
    assert len(calls) == 3
