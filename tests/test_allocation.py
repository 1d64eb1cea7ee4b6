"""Cross-layer budgets (kvpress_mm/allocation.py): a model-scope strategy's allocation is checked (shape, integer
counts, the uniform total, 1 .. the row's real tokens per layer) and its counts are what each layer keeps."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import rows_for, tiny

from kvpress_mm.registry import strategy_class

VLCache, _ = strategy_class("vl_cache")


@dataclass
class _Allocates(VLCache):
    """VL-Cache whose allocation is replaced: `how` picks a good or a malformed one."""

    how: str = "shift"

    def allocate(self, summaries, n_valid, num_layers):
        uniform = self.kept_counts(n_valid, 0, num_layers)
        counts = uniform[None].repeat(num_layers, 1)
        if self.how == "shift":  # one token moved from the last layer to the first
            counts[0] += 1
            counts[-1] -= 1
        elif self.how == "float":
            return counts.float()
        elif self.how == "shape":
            return counts[:1]
        elif self.how == "total":
            counts[0] += 1
        elif self.how == "range":
            counts[0] = n_valid + 1
            counts[-1] -= n_valid + 1 - uniform
        return counts


def test_the_allocated_counts_are_kept_per_layer():
    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    strategy = _Allocates(budget=0.5)
    with strategy(t.model) as session:
        t.model(**inputs, use_cache=True)
    n_valid = inputs["attention_mask"].sum(-1)
    uniform = strategy.kept_counts(n_valid, 0, 2)
    kept = {i: session.kept[i].sum(-1).amax(-1) for i in (0, 1)}
    assert torch.equal(kept[0], uniform + 1) and torch.equal(kept[1], uniform - 1)


@pytest.mark.parametrize(
    "how, message",
    [
        ("float", r"_Allocates.allocate returned \(2, 2\); expected integer counts of shape \(2, 2\)"),
        ("shape", r"_Allocates.allocate returned \(1, 2\); expected integer counts of shape \(2, 2\)"),
        ("total", r"_Allocates.allocate must keep in all what the uniform budget keeps \(2 x uniform\)"),
        ("range", r"_Allocates.allocate gave a layer fewer than 1 or more than its row's real tokens"),
    ],
)
def test_a_malformed_allocation_names_the_strategy(how, message):
    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    with pytest.raises(ValueError, match=message):
        with _Allocates(budget=0.5, how=how)(t.model):
            t.model(**inputs, use_cache=True)
    assert not t.model._forward_hooks and not t.model._forward_pre_hooks
