"""The row-wise position helpers equal torch.gather / scatter with an index expanded over D."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_mm.cache_ops import gather_positions, put_positions

torch.set_num_threads(1)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 4),
    length=st.integers(1, 40),
    n=st.integers(1, 50),
    d=st.sampled_from([1, 4, 8]),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_position_helpers_match_gather_and_scatter(b, h, length, n, d, shared, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(b, h, length, d, generator=g).to(dtype)
    index = torch.randint(0, length, (b, 1 if shared else h, n), generator=g)
    full_index = index.expand(b, h, n)[..., None].expand(-1, -1, -1, d)
    assert torch.equal(gather_positions(states, index), torch.gather(states, 2, full_index))

    distinct = torch.stack([torch.randperm(length, generator=g)[: min(n, length)] for _ in range(b * h)])
    distinct = distinct.view(b, h, -1)
    values = torch.randn(b, h, distinct.shape[-1], d, generator=g).to(dtype)
    out = put_positions(states, distinct, values)
    assert torch.equal(out, states.scatter(2, distinct[..., None].expand(-1, -1, -1, d), values))
    assert out.data_ptr() != states.data_ptr()
