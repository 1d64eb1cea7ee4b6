"""Decode-phase compression (h2o, streaming_llm): the cache stays within budget + N while generating."""

import pytest
import torch
from helpers import generate, tiny

import kvpress_mm

STEPS = 30


def _track_lengths(model):
    """Physical cache lengths of every layer after each forward, and the sessions' layouts."""
    seen = []

    def hook(module, args, kwargs, output):
        seen.append([layer.keys.shape[2] for layer in output.cache.layers])

    return seen, model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name", ["h2o", "streaming_llm"])
@pytest.mark.parametrize("phase,every", [("both", 1), ("both", 4), ("decode", 3)])
def test_cache_never_exceeds_budget_plus_n(name, phase, every):
    t = tiny("llama")
    inputs = t.make_inputs([[("text", 40)], [("text", 33)]])
    strategy = kvpress_mm.get_strategy(name, budget=0.25, phase=phase, compress_every=every)
    seen, handle = _track_lengths(t.model)
    try:
        with strategy(t.model):
            tokens, logits = generate(t.model, inputs, steps=STEPS)
    finally:
        handle.remove()
    cap = int(strategy.kept_counts(inputs["attention_mask"].sum(-1), 0, 2).max())  # 10
    assert torch.isfinite(logits).all()
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + STEPS
    decode_lengths = [max(step) for step in seen[1:]]
    assert max(decode_lengths) <= cap + every
    if phase == "both":
        assert max(seen[0]) == cap  # compressed right after prefill
    else:
        assert max(seen[0]) == inputs["input_ids"].shape[1]  # prompt kept whole, evicted once decoding starts
    # without decode-phase eviction the cache would have grown to cap + STEPS - 1
    assert decode_lengths[-1] < cap + STEPS - 1


def test_streaming_decode_phase_equals_masked_full_cache():
    """Every decode step attends exactly to the positions the compressed cache holds (sinks + recent)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    t = tiny("llama")
    inputs = t.make_inputs([[("text", 40)]])
    strategy = kvpress_mm.get_strategy("streaming_llm", budget=0.25, sinks=2, phase="both", compress_every=3)
    held = []  # per forward: {layer: original positions held after the step}

    def snapshot(module, args, kwargs, output):
        held.append(
            {
                idx: set(state.current_positions(output.cache.layers[idx].keys.shape[2])[0, 0].tolist())
                for idx, state in press.states.items()
            }
        )

    with strategy(t.model) as press:
        handle = t.model.register_forward_hook(snapshot, with_kwargs=True)
        try:
            tokens, logits = generate(t.model, inputs, steps=12)
        finally:
            handle.remove()
    # the same steps on the full cache, masking what the compressed cache did not hold at each step
    step = {"i": 0}

    def masked(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == key.shape[2]:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        # decode step i attends to what was held after step i-1, plus the token being decoded
        allowed_positions = held[step["i"] - 1][module.layer_idx] | {key.shape[2] - 1}
        allowed = torch.zeros(key.shape[2], dtype=torch.bool, device=key.device)
        allowed[sorted(allowed_positions)] = True
        return sdpa_attention_forward(module, query, key, value, allowed[None, None, None, :], **kwargs)

    AttentionInterface.register("kvpress_mm_test_dynamic_mask", masked)
    AttentionMaskInterface.register("kvpress_mm_test_dynamic_mask", sdpa_mask)

    def count(module, args, kwargs):
        step["i"] += 1 if step.get("started") else 0
        step["started"] = True

    t.model.set_attn_implementation("kvpress_mm_test_dynamic_mask")
    handle = t.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        ref_tokens, ref_logits = generate(t.model, inputs, steps=12)
    finally:
        handle.remove()
        t.model.set_attn_implementation("sdpa")
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    # the held set really is sinks + the most recent tokens
    last = held[-1][0]
    assert {0, 1} <= last and len(last) <= 10 + 3
