"""Compression inside model.generate() of every supported family: exactness, masked-cache equivalence, batching."""

import pytest
import torch
from helpers import generate, masked_reference_generate, profile_fields, rows_for, tiny

import kvpress_mm
from kvpress_mm.head_profiles import ModelIdentity
from kvpress_mm.testing import TINY_FAMILIES

NON_MERGING = [
    "streaming_llm",
    "h2o",
    "snapkv",
    "tova",
    "knorm",
    "random",
    "pyramidkv",
    "adakv",
    "text_prior_h2o",
    "mean_h2o",
]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_budget_one_is_token_identical(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    ref_tokens, _ = generate(t.model, inputs, steps=8)
    for name in kvpress_mm.list_strategies():
        with kvpress_mm.get_strategy(name, budget=1.0)(t.model):
            tokens, _ = generate(t.model, inputs, steps=8)
        assert torch.equal(tokens, ref_tokens), f"{name} at budget 1.0 changed the output of {family}"


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", NON_MERGING)
def test_eviction_equals_masked_full_cache(family, name):
    """After eviction, decode logits equal the full cache's with evicted positions masked (RoPE stays right)."""
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    with kvpress_mm.get_strategy(name, budget=0.3)(t.model) as press:
        tokens, logits = generate(t.model, inputs, steps=6)
    assert press.compressed_any
    kept = dict(press.kept)
    ref_tokens, ref_logits = masked_reference_generate(t.model, inputs, kept, steps=6)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    # the physical cache shrank to the largest kept count of a (row, kv head) in each layer
    for idx, keep in kept.items():
        report = press.report.layers[idx]
        assert report.after_tokens == int(keep.sum(-1).max()) < report.before_tokens


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_batch_rows_equal_single_rows(family, name):
    """A left-padded batch is compressed row by row: each row's logits equal its own single-row run."""
    t = tiny(family)
    rows = rows_for(t)
    strategy = kvpress_mm.get_strategy(name, budget=0.4)
    for order in (rows, rows[::-1]):
        # make_inputs draws tokens and pixels row by row, so the first row of a batch equals the row alone
        batch = t.make_inputs(order)
        single = t.make_inputs(order[:1])
        with strategy(t.model):
            _, batch_logits = generate(t.model, batch, steps=5)
        with strategy(t.model):
            _, row_logits = generate(t.model, single, steps=5)
        torch.testing.assert_close(batch_logits[:1], row_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_padding_never_kept(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    pad = inputs["attention_mask"] == 0
    with kvpress_mm.get_strategy("h2o", budget=0.5)(t.model) as press:
        generate(t.model, inputs, steps=2)
    for keep in press.kept.values():
        assert not bool((keep & pad[:, None, :]).any())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_strategy_runs_in_generate(family):
    """Smoke: every registered strategy compresses a left-padded multimodal batch inside generate()."""
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    for name in kvpress_mm.list_strategies():
        fields = profile_fields(name, ModelIdentity.of(t.model))
        with kvpress_mm.get_strategy(name, budget=0.3, **fields)(t.model) as press:
            tokens, logits = generate(t.model, inputs, steps=3)
        assert torch.isfinite(logits).all(), name
        assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3
        if name != "full":
            assert press.report.after_bytes < press.report.before_bytes, name


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "idefics3", "internvl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(family, dtype):
    """bf16 / fp16 models: statistics in fp32, the compacted cache keeps the model's dtype, output finite."""
    from transformers import DynamicCache

    t = tiny(family, dtype)
    inputs = t.make_inputs(rows_for(t))
    text_config = t.model.config.get_text_config()
    for name in ("h2o", "look_m", "adakv"):
        cache = DynamicCache(config=text_config)
        with kvpress_mm.get_strategy(name, budget=0.3)(t.model) as press:
            tokens, logits = generate(t.model, inputs, steps=3, cache=cache)
        assert torch.isfinite(logits).all(), name
        assert press.compressed_any
        for idx in press.kept:
            assert cache.layers[idx].keys.dtype == dtype and cache.layers[idx].values.dtype == dtype


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_padded_batch_statistics_take_the_one_pass_path_where_the_mask_allows(family, monkeypatch):
    """Causal + left padding is applied inside the one-pass attention (CPU); Gemma3's masks (bidirectional
    image blocks) are not that form and keep the model's own kernel + the masked statistics pass, as every
    model does on CUDA. test_batch_rows_equal_single_rows checks the numbers of both paths."""
    from kvpress_mm import statistics as session_module

    calls = []
    original = session_module.attention_with_statistics

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        key_valid = kwargs.get("key_valid", args[4] if len(args) > 4 else None)
        calls.append(key_valid is not None and result is not None)
        return result

    monkeypatch.setattr(session_module, "attention_with_statistics", spy)
    t = tiny(family)
    with kvpress_mm.get_strategy("h2o", budget=0.4)(t.model):
        generate(t.model, t.make_inputs(rows_for(t)), steps=2)
    if family == "gemma3" or t.model.device.type != "cpu":
        assert not any(calls)
    else:
        assert calls and all(calls)
