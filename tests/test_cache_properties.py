"""Property-based invariants of every strategy's plan and of the cache compaction (hypothesis)."""

import pytest
import torch
from helpers import profile_fields
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpress_mm
from kvpress_mm.attention_stats import accumulated_attention, window_attention
from kvpress_mm.cache_ops import compact_index, gather_positions
from kvpress_mm.head_profiles import ModelIdentity
from kvpress_mm.layer import LayerKV
from kvpress_mm.modality import Modality

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layer_cases(draw):
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    length = draw(st.integers(2, 70))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    dtype = draw(st.sampled_from(DTYPES))
    pads = [draw(st.integers(0, length - 1)) for _ in range(batch)]
    # runs of text / image / video tokens, like interleaved multimodal prompts
    runs = draw(st.lists(st.tuples(st.sampled_from([0, 1, 2]), st.integers(1, 20)), min_size=1, max_size=8))
    if draw(st.booleans()):
        budget, budget_tokens = draw(st.floats(0.01, 1.0)), None
    else:
        budget, budget_tokens = 1.0, draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**16))
    return batch, kv_heads, groups, length, head_dim, dtype, pads, runs, budget, budget_tokens, seed


def make_layer(case, strategy) -> LayerKV:
    batch, kv_heads, groups, length, head_dim, dtype, pads, runs, _, _, seed = case
    gen = torch.Generator().manual_seed(seed)
    layout = torch.cat([torch.full((n,), m, dtype=torch.int8) for m, n in runs])
    layout = layout.repeat(length // len(layout) + 1)[:length]
    modality = layout[None].repeat(batch, 1)
    for b, pad in enumerate(pads):
        modality[b, :pad] = int(Modality.PAD)
    valid = modality != int(Modality.PAD)
    heads = kv_heads * groups
    q = (torch.randn(batch, heads, length, head_dim, generator=gen) * 2).to(dtype)
    k = (torch.randn(batch, kv_heads, length, head_dim, generator=gen) * 2).to(dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    needs = strategy.needs()
    scale = head_dim**-0.5
    window = window_attention(q, k, scale, needs.window, allowed, valid) if needs.window else None
    accumulated = accumulated_attention(q, k, scale, allowed, valid) if needs.accumulated else None
    return LayerKV(
        layer_idx=0,
        num_layers=4,
        keys=k,
        values=v,
        modality=modality,
        keep_count=strategy.kept_counts(valid.sum(-1), 0, 4),
        num_query_heads=heads,
        window_attention=window,
        accumulated_attention=accumulated,
    )


@pytest.mark.parametrize("name", kvpress_mm.list_strategies())
@SETTINGS
@given(case=layer_cases())
def test_plan_invariants(name, case):
    budget, budget_tokens = case[8], case[9]
    identity = ModelIdentity("llava", 4, case[1], case[1] * case[2])
    strategy = kvpress_mm.get_strategy(
        name, budget=budget, budget_tokens=budget_tokens, **profile_fields(name, identity)
    )
    layer = make_layer(case, strategy)
    plan = strategy.plan(layer)
    keep = plan.keep.expand(layer.batch, layer.kv_heads, layer.length)
    assert keep.dtype == torch.bool
    # never padding; exactly the budget rule per (row, kv head), or per row for head-wise budgets
    assert not bool((keep & ~layer.valid[:, None, :]).any())
    counts = keep.sum(-1)
    if strategy.headwise_budgets:
        assert torch.equal(counts.sum(-1), layer.keep_count * layer.kv_heads)
    elif strategy.exact_budget:
        assert torch.equal(counts, layer.keep_count[:, None].expand(-1, layer.kv_heads))
    else:
        assert bool((counts >= layer.keep_count[:, None]).all())
    promised = strategy.promised(layer)
    if promised is not None:
        assert bool((keep | ~promised[:, None, :]).all()), "a promised token (sink / window) was evicted"

    index, slot_valid = compact_index(plan.keep)
    for b in range(layer.batch):
        for h in range(index.shape[1]):
            kept = index[b, h][slot_valid[b, h]]
            assert kept.unique().numel() == kept.numel()
            assert bool((kept[1:] > kept[:-1]).all()), "kept positions must stay in original order"
            assert index[b, h].unique().numel() == index.shape[-1]
    keys = gather_positions(plan.keys if plan.keys is not None else layer.keys, index)
    values = gather_positions(plan.values if plan.values is not None else layer.values, index)
    for t in (keys, values):
        assert t.dtype == layer.keys.dtype and t.device == layer.keys.device
        assert torch.isfinite(t.float()).all()
    if plan.keys is None:
        h_idx = index.expand(layer.batch, layer.kv_heads, -1)
        for b in range(layer.batch):
            for h in range(layer.kv_heads):
                assert torch.equal(keys[b, h], layer.keys[b, h, h_idx[b, h]])


@SETTINGS
@given(
    keep=st.lists(st.lists(st.booleans(), min_size=12, max_size=12), min_size=1, max_size=6).filter(
        lambda rows: all(any(r) for r in rows)
    )
)
def test_compact_index_left_pads_and_preserves_order(keep):
    keep = torch.tensor(keep)[:, None, :]
    index, slot_valid = compact_index(keep)
    counts = keep.sum(-1)
    assert index.shape[-1] == int(counts.max())
    for b in range(keep.shape[0]):
        n = int(counts[b, 0])
        assert slot_valid[b, 0].tolist() == [False] * (index.shape[-1] - n) + [True] * n
        assert index[b, 0, index.shape[-1] - n :].tolist() == torch.nonzero(keep[b, 0]).flatten().tolist()


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    budget=st.floats(0.05, 1.0),
    lengths=st.lists(st.integers(3, 30), min_size=1, max_size=3),
    name=st.sampled_from(["streaming_llm", "h2o", "snapkv"]),
)
def test_cache_lengths_in_generate_follow_budget(budget, lengths, name):
    """Inside a real model.generate(): every layer holds max-over-rows(budget rule) prompt slots."""
    from helpers import tiny
    from transformers import DynamicCache

    t = tiny("llava")
    rows = [[("text", n), ("image",), ("text", 3)] for n in lengths]
    inputs = t.make_inputs(rows)
    cache = DynamicCache(config=t.model.config.text_config)
    with kvpress_mm.get_strategy(name, budget=budget)(t.model) as press:
        t.model.generate(**inputs, max_new_tokens=3, do_sample=False, cache=cache)
    n_valid = inputs["attention_mask"].sum(-1)
    per_row = kvpress_mm.get_strategy(name, budget=budget).kept_counts(n_valid, 0, 2)
    sizes = kvpress_mm.cache_size(cache).tokens_per_layer
    # prompt slots (the longest row's budget) + the 2 generated tokens fed back
    assert sizes == [int(per_row.max()) + 2] * len(sizes)
    for keep in press.kept.values():
        assert torch.equal(keep.expand(-1, 2, -1).sum(-1), per_row[:, None].expand(-1, 2))
