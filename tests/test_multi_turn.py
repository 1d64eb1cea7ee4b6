"""Follow-up turns on a compressed cache, the usual transformers way: generate(history + new ids, cache=...).

Every turn's logits equal the masked reference (the same forwards on an uncompressed cache, each one's queries
seeing only what the compressed cache held before it) to 1e-4 in fp32, over three turns, with padded
batches of two conversations, per-head selection, merging and decode-phase eviction.
"""

import copy

import pytest
import torch
from conversation import HeldRecorder, HeldReference, expanded, follow_up, generate, turn_ids
from helpers import rows_for, tiny

import kvpress_mm
from kvpress_mm.compressed_cache import CompressedCache, CompressedLayer

FAMILIES = ["llava", "qwen2_vl", "gemma3", "llama"]
STEPS = 4


def _conversation(t, strategy, inputs, turns=3, inside=True):
    """Run `turns` turns; returns ([logits per turn], [inputs per turn], final cache, held per forward)."""
    logits, history, cache, seq = [], [], None, None
    cur = inputs
    with HeldRecorder(t.model) as rec:
        for k in range(turns):
            if k:
                cur = follow_up(cur, seq, turn_ids(t, inputs["input_ids"].shape[0], 5 + 2 * k, seed=20 + k))
            if inside or k == 0:
                with strategy(t.model):
                    seq, out, cache = generate(t.model, cur, STEPS, cache=cache)
            else:
                seq, out, cache = generate(t.model, cur, STEPS, cache=cache)
            logits.append(out)
            history.append(cur)
    return logits, history, cache, rec.held


def _reference(t, history, held):
    out, cache = [], None
    with HeldReference(t.model, held):
        for cur in history:
            _, logits, cache = generate(t.model, cur, STEPS, cache=cache)
            out.append(logits)
    return out


def _assert_turns_close(got, ref):
    for k, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m: f"turn {k + 1}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "name,fields",
    [("snapkv", {}), ("streaming_llm", {"phase": "both", "compress_every": 2}), ("adakv", {})],
)
def test_follow_up_turns_equal_masked_reference(family, name, fields):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))  # two left-padded conversations
    strategy = kvpress_mm.get_strategy(name, budget=0.4, **fields)
    got, history, cache, held = _conversation(t, strategy, inputs)
    assert isinstance(cache, CompressedCache) and cache.compacted
    _assert_turns_close(got, _reference(t, history, held))
    # the cache stands for the whole history while holding fewer slots
    logical = history[-1]["input_ids"].shape[1] + STEPS - 1
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer):
            assert layer.get_seq_length() == logical
            assert layer.physical_length < logical


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_follow_up_equals_reference_from_the_merged_cache(family):
    """look_m: turns 2 and 3 equal the full-length cache holding the merged states at their positions."""
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    strategy = kvpress_mm.get_strategy("look_m", budget=0.4)
    with strategy(t.model):
        seq, _, cache = generate(t.model, inputs, STEPS)
    ref_cache = expanded(cache)
    held_after_turn_1 = [{i: k.clone() for i, k in cache.kept_positions().items()}]
    cur, ref_cur = inputs, inputs
    ref_seq = seq
    for k in range(1, 3):
        cur = follow_up(cur, seq, turn_ids(t, 2, 6 + k, seed=30 + k))
        with HeldRecorder(t.model) as rec, strategy(t.model):
            seq, got, cache = generate(t.model, cur, STEPS, cache=cache)
        ref_cur = follow_up(ref_cur, ref_seq, turn_ids(t, 2, 6 + k, seed=30 + k))
        with HeldReference(t.model, held_after_turn_1 + rec.held, first_forward=1):
            ref_seq, ref, ref_cache = generate(t.model, ref_cur, STEPS, cache=ref_cache)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        assert torch.equal(seq, ref_seq)
        held_after_turn_1 = [rec.held[-1]]


def test_only_the_new_tokens_are_fed():
    """The old failure: the cache reported its physical length, so generate re-sent part of the prompt."""
    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t)[:1])
    strategy = kvpress_mm.get_strategy("streaming_llm", budget=0.5)
    with strategy(t.model):
        seq, _, cache = generate(t.model, inputs, STEPS)
    nxt = follow_up(inputs, seq, turn_ids(t, 1, 7, seed=1))
    fed = []
    handle = t.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        with strategy(t.model):
            generate(t.model, nxt, 2, cache=cache)
    finally:
        handle.remove()
    # the last answer token (not yet in the cache) + the 7 follow-up ids, then one decode step
    assert fed == [8, 1]


@pytest.mark.parametrize("family", ["llava", "llama"])
def test_outside_the_context_plain_layouts_continue_exactly(family):
    """Batch 1 with per-layer-uniform budgets: the model's own mask reads the compacted cache correctly."""
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t)[:1])
    strategy = kvpress_mm.get_strategy("snapkv", budget=0.4)
    got, history, cache, held = _conversation(t, strategy, inputs, inside=False)
    assert cache.compacted and cache.plain
    _assert_turns_close(got, _reference(t, history, held))


def test_outside_the_context_other_layouts_are_refused_clearly():
    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t))  # padded: rows keep different counts
    strategy = kvpress_mm.get_strategy("snapkv", budget=0.4)
    with strategy(t.model):
        seq, _, cache = generate(t.model, inputs, STEPS)
    assert not cache.plain
    nxt = follow_up(inputs, seq, turn_ids(t, 2, 5, seed=3))
    with pytest.raises(ValueError, match=r"inside `with strategy\(model\):`"):
        generate(t.model, nxt, 2, cache=cache)


def test_copies_are_independent():
    t = tiny("qwen2_vl")
    inputs = t.make_inputs(rows_for(t))
    strategy = kvpress_mm.get_strategy("snapkv", budget=0.4)
    with strategy(t.model):
        seq, _, cache = generate(t.model, inputs, STEPS)
    before = [(layer.keys.clone(), layer.get_seq_length()) for layer in cache.layers]
    fork, copied = cache.fork(), copy.deepcopy(cache)
    nxt = follow_up(inputs, seq, turn_ids(t, 2, 6, seed=4))
    with strategy(t.model):
        _, on_fork, _ = generate(t.model, nxt, STEPS, cache=fork)
        _, on_copy, _ = generate(t.model, nxt, STEPS, cache=copied)
    for layer, (keys, length) in zip(cache.layers, before):
        assert torch.equal(layer.keys, keys) and layer.get_seq_length() == length
    torch.testing.assert_close(on_fork, on_copy, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llava", "llama"])
def test_every_prompt_compresses_later_turns_too(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    first = kvpress_mm.get_strategy("h2o", budget=0.4)
    every = kvpress_mm.get_strategy("h2o", budget=0.4, compress="every_prompt")
    _, _, first_cache, _ = _conversation(t, first, inputs)
    got, history, cache, held = _conversation(t, every, inputs)
    _assert_turns_close(got, _reference(t, history, held))
    for a, b in zip(first_cache.layers, cache.layers):
        if isinstance(a, CompressedLayer):
            assert b.physical_length < a.physical_length
            assert b.get_seq_length() == a.get_seq_length()


def test_compress_field_is_validated():
    with pytest.raises(ValueError, match="compress"):
        kvpress_mm.get_strategy("snapkv", compress="every_turn")
