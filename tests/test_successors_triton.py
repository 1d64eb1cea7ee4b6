"""The Triton sums (CUDA path) over a query set, called as the statistics call them: the set's rows only."""

import pytest
import torch

pytest.importorskip("triton")

from test_attention_stats_triton import interpreted  # noqa: E402,F401  (the fixture: kernels in the interpreter)
from test_successors_stats import _case, _members, _probs  # noqa: E402

from kvpress_mm.attention_stats import accumulated_attention  # noqa: E402


@pytest.mark.parametrize("past", [0, 7])
def test_triton_sums_over_post_vision_rows_equal_python(interpreted, past):  # noqa: F811
    q, k, _, labels, _, allowed = _case(past)
    members = torch.zeros(labels.shape, dtype=torch.bool)
    for row, rows in enumerate(_members(labels, "post_vision")):
        members[row, rows] = True
    lo = int(members.int().argmax(-1).min())
    scale = q.shape[-1] ** -0.5
    got = interpreted.accumulated_attention(q[:, :, lo:], k, scale, allowed[:, :, lo:], members[:, lo:], past == 0)
    probs = _probs(q, k, allowed)
    expected = (probs * members[:, None, :, None]).sum(2)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, accumulated_attention(q[:, :, lo:], k, scale, allowed[:, :, lo:], members[:, lo:]))
