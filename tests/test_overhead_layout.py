"""A first prompt laid out without host reads (compaction.PromptLayout, layer_state.planned_state): the same
cache, layouts and reports as the checked path, plan errors raised at the forward's end, plans keeping fewer
than their budget masked correctly, and the prompt-only work done once per prompt."""

import math
from dataclasses import dataclass

import pytest
import torch
from helpers import MIXED_ROWS, TEXT_ROWS, generate, masked_reference_generate, rows_for, tiny
from kvpress_mm.strategies.h2o import H2O
from kvpress_mm.strategies.knorm import KNorm
from kvpress_mm.strategies.snapkv import SnapKV, keep_best
from kvpress_mm.strategies.streaming_llm import StreamingLLM

import kvpress_mm
from kvpress_mm import compaction
from kvpress_mm.budget import kept_counts
from kvpress_mm.compressed_cache import CompressedLayer

CLASSES = {"streaming_llm": StreamingLLM, "knorm": KNorm, "snapkv": SnapKV, "h2o": H2O}


def _checked(cls):
    """The same strategy laid out by the checked path (a host read per layer): exact_budget off."""
    return dataclass(type(f"Checked{cls.__name__}", (cls,), {"exact_budget": False}))


def _layers(cache):
    return {i: layer for i, layer in enumerate(cache.layers) if isinstance(layer, CompressedLayer)}


def _run(strategy, t, inputs):
    from transformers import DynamicCache

    cache = DynamicCache(config=t.model.config.get_text_config())
    with strategy(t.model) as press:
        tokens, logits = generate(t.model, inputs, steps=3, cache=cache)
    return press, cache, tokens, logits


@pytest.mark.parametrize("family", ["llama", "llava", "qwen2_vl"])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_read_free_layout_equals_the_checked_one(family, name):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))  # padded rows; images at different positions
    fast = _run(CLASSES[name](budget=0.3), t, inputs)
    slow = _run(_checked(CLASSES[name])(budget=0.3), t, inputs)
    assert torch.equal(fast[2], slow[2]) and torch.allclose(fast[3], slow[3])
    fast_layers, slow_layers = _layers(fast[1]), _layers(slow[1])
    assert fast_layers.keys() == slow_layers.keys() and fast_layers
    for i, a in fast_layers.items():
        b = slow_layers[i]
        assert a.pending is None
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        sa, sb = a.state, b.state
        assert sa.base_len == sb.base_len and sa.total == sb.total and sa.compacted == sb.compacted
        assert (sa.slots is None) == (sb.slots is None)
        if sa.slots is not None:
            assert torch.equal(sa.slots, sb.slots)
        assert torch.equal(sa.modality, sb.modality) and torch.equal(sa.positions.expand_as(sb.positions), sb.positions)
        assert torch.equal(sa.cap, sb.cap)
        ra, rb = fast[0].report.layers[i], slow[0].report.layers[i]
        assert (ra.before_tokens, ra.after_tokens, ra.before_bytes, ra.after_bytes) == (
            rb.before_tokens,
            rb.after_tokens,
            rb.before_bytes,
            rb.after_bytes,
        )
        assert ra.kept_fraction == pytest.approx(rb.kept_fraction)
        assert torch.equal(fast[0].kept[i], slow[0].kept[i])
    assert fast[1].plain == slow[1].plain


@dataclass
class _KeepsFewer(kvpress_mm.EvictionStrategy):
    """Keeps the last keep_count - 2 real tokens of each row, and in kv head 1 one token fewer still."""

    def plan(self, layer):
        from kvpress_mm.selection import last_tokens

        keep = last_tokens(layer, (layer.keep_count - 2).clamp(min=1))[:, None, :].expand(-1, layer.kv_heads, -1)
        fewer = last_tokens(layer, (layer.keep_count - 3).clamp(min=1))
        return kvpress_mm.Plan(keep=torch.stack([keep[:, 0], fewer], dim=1) if layer.kv_heads == 2 else keep)


def test_a_plan_keeping_fewer_than_its_budget_is_masked_as_it_kept():
    t = tiny("llama")  # 2 kv heads
    inputs = t.make_inputs(TEXT_ROWS)
    with _KeepsFewer(budget=0.5)(t.model) as press:
        tokens, logits = generate(t.model, inputs, steps=4)
    ref_tokens, ref_logits = masked_reference_generate(t.model, inputs, press.kept, steps=4)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    real = inputs["attention_mask"].sum(-1)
    for report in press.report.layers.values():
        kept = [(math.floor(n * 0.5 + 1e-6) - 2) / n for n in real.tolist()]
        kept += [(math.floor(n * 0.5 + 1e-6) - 3) / n for n in real.tolist()]
        assert report.kept_fraction == pytest.approx(sum(kept) / len(kept))


@dataclass
class _KeepsMore(kvpress_mm.EvictionStrategy):
    def plan(self, layer):
        from kvpress_mm.selection import last_tokens

        return kvpress_mm.Plan(keep=last_tokens(layer, layer.keep_count + 1)[:, None, :])


def test_a_plan_keeping_more_than_its_budget_is_an_error_naming_exact_budget():
    t = tiny("llama")
    with pytest.raises(ValueError, match="exact_budget") as err:
        with _KeepsMore(budget=0.5)(t.model):
            t.model(**t.make_inputs(TEXT_ROWS))
    assert "_KeepsMore.plan kept more tokens" in str(err.value) and "layer 0" in str(err.value)
    # declared, it is laid out from what it kept
    declared = dataclass(type("Declared", (_KeepsMore,), {"exact_budget": False}))
    with declared(budget=0.5)(t.model) as press:
        generate(t.model, t.make_inputs(TEXT_ROWS), steps=2)
    assert press.compressed_any


def test_an_empty_row_is_still_an_error():
    @dataclass
    class KeepsNothing(kvpress_mm.EvictionStrategy):
        def plan(self, layer):
            return kvpress_mm.Plan(keep=torch.zeros_like(layer.valid)[:, None, :])

    t = tiny("llama")
    with pytest.raises(ValueError, match="kept no token for some \\(row, head\\) of layer 0"):
        with KeepsNothing(budget=0.5)(t.model):
            t.model(**t.make_inputs(TEXT_ROWS))


def test_prompt_only_parts_are_computed_once_per_prompt(monkeypatch):
    """StreamingLLM's mask and its layout: once for the prompt's layers; a later prompt gets its own."""
    t = tiny("llama")
    calls = []
    original = compaction.planned_state

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(compaction, "planned_state", spy)
    strategy = StreamingLLM(budget=0.3)
    with strategy(t.model) as press:
        generate(t.model, t.make_inputs(TEXT_ROWS), steps=2)
        first = press.kept
        assert len(calls) == 1 and len(first) == t.model.config.num_hidden_layers
        assert len({id(k) for k in first.values()}) == 1  # one mask object for every layer
        generate(t.model, t.make_inputs([[("text", 30)], [("text", 44)]]), steps=2)
    assert len(calls) == 2


@pytest.mark.parametrize("budget, budget_tokens", [(0.2, None), (0.29, None), (1 / 3, None), (0.05, None), (1.0, 7)])
def test_host_kept_counts_are_the_budget_rule(budget, budget_tokens):
    lengths = list(range(0, 300)) + [1023, 4096, 8191]
    expected = kept_counts(torch.tensor(lengths), budget, budget_tokens).tolist()
    assert compaction.host_kept_counts(lengths, budget, budget_tokens) == expected


def test_keep_best_is_keep_top_without_a_host_read():
    from kvpress_mm.layer import LayerKV
    from kvpress_mm.modality import Modality
    from kvpress_mm.selection import keep_top

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        b, h, length = 3, 2, 40
        modality = torch.full((b, length), int(Modality.TEXT), dtype=torch.int8)
        modality[1, :7] = int(Modality.PAD)
        modality[2, :19] = int(Modality.PAD)
        keys = torch.randn(b, h, length, 8, generator=gen)
        n_valid = (modality != int(Modality.PAD)).sum(-1)
        layer = LayerKV(0, 2, keys, keys, modality, kept_counts(n_valid, 0.3), h)
        scores = torch.randn(b, h, length, generator=gen)
        if trial % 3 == 0:
            scores[0, 0, 5] = float("nan")
        protect = layer.valid & (layer.rank >= (layer.n_valid - 3)[:, None])
        for p in (None, protect):
            assert torch.equal(keep_best(scores, layer, protect=p), keep_top(scores, layer, protect=p))


def test_trusted_layout_is_not_used_for_cross_layer_or_headwise_budgets():
    t = tiny("llava")
    for name in ("adakv", "pyramidkv", "madakv"):
        strategy = kvpress_mm.get_strategy(name, budget=0.3)
        with strategy(t.model) as press:
            generate(t.model, t.make_inputs(MIXED_ROWS), steps=2)
        assert press.compressed_any
        assert all(layer.pending is None for layer in _layers(press.cache).values())


def test_prompt_layouts_do_not_outlive_their_prompts():
    import gc

    t = tiny("llama")
    strategy = H2O(budget=0.3)
    with strategy(t.model):
        for _ in range(3):
            generate(t.model, t.make_inputs(TEXT_ROWS), steps=1)
    gc.collect()
    assert len(compaction._LAYOUTS) <= 1  # the last prompt's (held by the session until the next one)
