"""The context manager leaves the model exactly as it found it, also after an exception."""

import pytest
import torch
from helpers import generate, parameters_snapshot, rows_for, tiny

import kvpress_mm
from kvpress_mm.adapters import adapter_for


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2_vl"])
def test_model_unchanged_after_context(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    with torch.no_grad():
        before = t.model(**inputs).logits
    params = parameters_snapshot(t.model)
    decoder = adapter_for(t.model).decoder(t.model)
    backend = decoder.config._attn_implementation
    hooks = _hook_count(t.model)
    with kvpress_mm.get_strategy("snapkv", budget=0.2)(t.model):
        assert decoder.config._attn_implementation != backend
        generate(t.model, inputs, steps=3)
    assert decoder.config._attn_implementation == backend
    assert _hook_count(t.model) == hooks
    with torch.no_grad():
        after = t.model(**inputs).logits
    assert torch.equal(before, after)
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, params[k])


def test_exception_inside_context_removes_everything():
    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t))
    decoder = adapter_for(t.model).decoder(t.model)
    hooks = _hook_count(t.model)
    with pytest.raises(RuntimeError, match="boom"):
        with kvpress_mm.get_strategy("h2o", budget=0.2)(t.model):
            generate(t.model, inputs, steps=2)
            raise RuntimeError("boom")
    assert _hook_count(t.model) == hooks
    assert decoder.config._attn_implementation == "sdpa"
    ref, _ = generate(t.model, inputs, steps=4)
    again, _ = generate(t.model, inputs, steps=4)
    assert torch.equal(ref, again)


def test_failing_strategy_inside_generate_still_cleans_up():
    from dataclasses import dataclass

    from kvpress_mm import EvictionStrategy

    @dataclass
    class Broken(EvictionStrategy):
        def plan(self, layer):
            raise ArithmeticError("strategy bug")

    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    hooks = _hook_count(t.model)
    with pytest.raises(ArithmeticError):
        with Broken(budget=0.5)(t.model):
            generate(t.model, inputs, steps=2)
    assert _hook_count(t.model) == hooks
    assert t.model.config._attn_implementation == "sdpa"


def test_report_and_cache_size():
    from transformers import DynamicCache

    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t))
    cache = DynamicCache(config=t.model.config.text_config)
    with kvpress_mm.get_strategy("streaming_llm", budget=0.25)(t.model) as press:
        t.model.generate(**inputs, max_new_tokens=3, do_sample=False, cache=cache)
    report = press.report
    length = inputs["input_ids"].shape[1]
    assert report.before_tokens == [length] * len(report.layers)
    longest = int(inputs["attention_mask"].sum(-1).max())
    assert report.after_tokens == [longest // 4] * len(report.layers)
    assert report.after_bytes < report.before_bytes
    size = kvpress_mm.cache_size(cache)
    # the generated tokens (all but the last, which is never fed back) were appended after compression
    assert size.tokens_per_layer == [longest // 4 + 2] * len(report.layers)
    assert "MiB" in report.summary()


def test_contexts_do_not_nest():
    t = tiny("llama")
    with kvpress_mm.get_strategy("h2o", budget=0.5)(t.model):
        with pytest.raises(RuntimeError, match="nest"):
            with kvpress_mm.get_strategy("snapkv", budget=0.5)(t.model):
                pass
    assert t.model.config._attn_implementation == "sdpa"


def test_sliding_layers_logged_once(caplog):
    import logging

    from kvpress_mm.testing import build_tiny

    t = build_tiny("gemma3")  # a fresh model: never compressed before
    inputs = t.make_inputs(rows_for(t))
    with caplog.at_level(logging.INFO, logger="kvpress_mm"):
        for _ in range(2):
            with kvpress_mm.get_strategy("snapkv", budget=0.3)(t.model) as press:
                generate(t.model, inputs, steps=2)
    messages = [r.getMessage() for r in caplog.records if "sliding-window" in r.getMessage()]
    assert len(messages) == 1
    sliding = adapter_for(t.model).sliding_layers(t.model)
    assert sliding and not (set(press.kept) & set(sliding))


def test_report_counts_sliding_layers_unchanged():
    t = tiny("gemma3")
    inputs = t.make_inputs(rows_for(t))
    with kvpress_mm.get_strategy("snapkv", budget=0.3)(t.model) as press:
        generate(t.model, inputs, steps=2)
    sliding = adapter_for(t.model).sliding_layers(t.model)
    assert set(press.report.layers) == set(range(t.model.config.text_config.num_hidden_layers))
    for idx in sliding:
        r = press.report.layers[idx]
        assert r.before_bytes == r.after_bytes and r.kept_fraction is None
    full = [i for i in press.report.layers if i not in sliding]
    assert all(press.report.layers[i].after_bytes < press.report.layers[i].before_bytes for i in full)
    assert abs(press.report.kept_fraction - sum(press.report.layers[i].kept_fraction for i in full) / len(full)) < 1e-9
