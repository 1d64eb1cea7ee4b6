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
from kvpress_mm.hooks import rope_owner
from kvpress_mm.session import CompressionSession
from kvpress_mm.testing import TINY_FAMILIES

# the families whose model keeps an M-RoPE offset of the last prompt (Qwen-VL's rope_deltas)
QWEN_VL = [f for f in TINY_FAMILIES if rope_owner(tiny(f).model) is not None]
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


@pytest.mark.parametrize("family", TINY_FAMILIES)
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


@pytest.mark.parametrize("family", TINY_FAMILIES)
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


@pytest.mark.parametrize("family", TINY_FAMILIES)
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


@pytest.mark.parametrize("family", TINY_FAMILIES)
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


@pytest.mark.parametrize("family", ["llava", "llama"])
@pytest.mark.parametrize("name", ["snapkv", "h2o"])
def test_later_turn_statistics_are_a_softmax_over_the_kept_past_and_the_new_keys(family, name, monkeypatch):
    """compress="every_prompt": the statistics a later prompt's plan receives (snapkv: window rows, h2o: sums)
    equal an explicit softmax of the prompt's queries over [the positions the cache kept | the new keys]."""
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))  # padded: the rows' pasts keep different counts
    strategy = kvpress_mm.get_strategy(name, budget=0.4, compress="every_prompt")
    with strategy(t.model):
        seq, _, cache = generate(t.model, inputs, STEPS)
    assert not cache.plain
    past_len = cache.get_seq_length()
    past, held = expanded(cache), cache.kept_positions()  # the kept states at their original positions
    views, queries = {}, {}
    plan, attention = type(strategy).plan, CompressionSession.attention

    def spy_plan(self, layer):
        views[layer.layer_idx] = layer
        return plan(self, layer)

    def spy_attention(self, base, module, query, key, value, mask, **kwargs):
        if query.shape[2] > 1:
            queries[module.layer_idx] = (query.clone(), kwargs.get("scaling") or query.shape[-1] ** -0.5)
        return attention(self, base, module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(type(strategy), "plan", spy_plan)
    monkeypatch.setattr(CompressionSession, "attention", spy_attention)
    nxt = follow_up(inputs, seq, turn_ids(t, 2, 9, seed=7))
    with strategy(t.model):
        generate(t.model, nxt, 1, cache=cache)
    n = nxt["input_ids"].shape[1] - past_len  # the last answer token + the 9 new ids
    assert sorted(views) == sorted(held) and n == 10
    for idx, view in views.items():
        query, scale = queries[idx]
        assert view.keys.shape[2] == query.shape[2] == n
        heads = query.shape[1]
        keys = torch.cat([past.layers[idx].keys, view.keys], dim=2)
        keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)
        kept = held[idx].repeat_interleave(heads // held[idx].shape[1], dim=1)  # [B, H, past]
        causal = torch.ones((n, n), dtype=torch.bool).tril()
        allowed = torch.cat([kept[:, :, None, :].expand(-1, -1, n, -1), causal.expand(*kept.shape[:2], n, n)], -1)
        scores = (query @ keys.transpose(-1, -2) * scale).masked_fill(~allowed, -torch.inf)
        probs = scores.softmax(-1)[..., past_len:]  # [B, H, n queries, n new keys]
        if name == "snapkv":
            window = view.window_attention
            assert window.shape == probs.shape  # the window (32) holds every new query
            torch.testing.assert_close(window, probs, atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(view.accumulated_attention, probs.sum(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", QWEN_VL)
def test_interleaved_qwen_conversations_each_continue_with_their_own_offset(family):
    """Qwen-VL: conversation B runs on the model between A's turns; A's turn 2 (generate, and a plain forward)
    still equals its masked reference: inside the strategy context the cache brings its M-RoPE offset, and
    continuing it leaves the model's offset (B's) as it was."""
    t = tiny(family)
    rows_a = [[("text", 9), ("image",), ("text", 14), ("image",), ("text", 11)]]
    a, b = t.make_inputs(rows_a, seed=1), t.make_inputs([[("image",), ("text", 30)]], seed=2)
    strategy = kvpress_mm.get_strategy("snapkv", budget=0.4)
    owner = rope_owner(t.model)
    with HeldRecorder(t.model) as rec, strategy(t.model):
        seq, first, cache = generate(t.model, a, STEPS)
    held = list(rec.held)
    with strategy(t.model):
        generate(t.model, b, STEPS)  # conversation B: the model now holds B's offset
    offset_b = owner.rope_deltas
    assert not torch.equal(offset_b, cache.rope_deltas)  # else this test would not tell them apart
    nxt = follow_up(a, seq, turn_ids(t, 1, 7, seed=5))
    fork = cache.fork()
    with HeldRecorder(t.model) as rec, strategy(t.model):
        _, second, _ = generate(t.model, nxt, STEPS, cache=cache)
        new = nxt["input_ids"][:, fork.get_seq_length() :]
        with torch.no_grad():  # a raw forward: the model computes the positions (from the cache's length)
            forward = t.model(input_ids=new, cache=fork)
        assert owner.rope_deltas is offset_b
    held += rec.held[:STEPS]  # generate's forwards (the plain forward comes last)
    assert owner.rope_deltas is offset_b and "_prepare_position_ids_for_generation" not in vars(t.model)
    with HeldReference(t.model, held):
        _, ref_first, ref_cache = generate(t.model, a, STEPS)
        _, ref_second, _ = generate(t.model, nxt, STEPS, cache=ref_cache)
    torch.testing.assert_close(first, ref_first, atol=1e-4, rtol=0)
    torch.testing.assert_close(second, ref_second, atol=1e-4, rtol=0)
    torch.testing.assert_close(forward.logits[:, -1].float(), ref_second[:, 0], atol=1e-4, rtol=0)


def test_the_offset_hooks_are_removed_on_exit_also_after_an_exception():
    t = tiny("qwen2_vl")
    model = t.model
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    strategy = kvpress_mm.get_strategy("snapkv", budget=0.4)
    with pytest.raises(RuntimeError, match="boom"), strategy(model):
        assert "_prepare_position_ids_for_generation" in vars(model)
        raise RuntimeError("boom")
    assert "_prepare_position_ids_for_generation" not in vars(model)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    inputs = t.make_inputs([[("text", 6)]])
    with pytest.raises(ValueError, match="use_cache"), strategy(model):
        model(**inputs, use_cache=False)  # the session's pre-hook raises after the offset's ran
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks


def test_the_offset_follows_the_cache_rows():
    cache = CompressedCache()
    cache.rope_deltas = torch.tensor([[3], [-2]])
    cache.batch_repeat_interleave(2)
    assert cache.rope_deltas.flatten().tolist() == [3, 3, -2, -2]
    cache.batch_select_indices(torch.tensor([3, 0]))
    assert cache.rope_deltas.flatten().tolist() == [-2, 3]
    cache.reorder_cache(torch.tensor([1, 1]))
    assert cache.rope_deltas.flatten().tolist() == [3, 3]
    shared = CompressedCache()
    shared.rope_deltas = torch.tensor([[5]])  # one row stands for every row
    shared.batch_repeat_interleave(3)
    assert shared.rope_deltas.tolist() == [[5]]
