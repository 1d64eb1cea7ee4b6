"""Each built-in strategy's selection against a slow reference from eager attention probabilities."""

import pytest
import torch
from helpers import TEXT_ROWS, generate

import kvpress_mm
from kvpress_mm.testing import build_tiny


@pytest.fixture(scope="module", params=[("llama", "sdpa"), ("llama", "eager"), ("qwen2_vl", "sdpa")])
def eager_llama(request):
    """The strategy runs on this family / backend; the reference always reads eager probabilities.

    Qwen2-VL checks that statistics use the model's own M-RoPE positions (image rows differ in h/w).
    """
    family, backend = request.param
    t = build_tiny(family)
    t.model.set_attn_implementation(backend)
    t.rows = (
        TEXT_ROWS
        if family == "llama"
        else [
            [("text", 9), ("image",), ("text", 30)],
            [("image",), ("text", 25)],
        ]
    )
    return t


def _prompt_probs(model, inputs):
    backend = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(backend)
    return [a.float() for a in out.attentions]  # per layer [B, H, L, L]


def _reference_sets(probs_per_layer, inputs, keep_of, score_of, protected_of, kv_heads):
    """Slow loops: per layer, row, kv head: protected positions + top-scored others."""
    mask = inputs["attention_mask"]
    result = {}
    for layer, probs in enumerate(probs_per_layer):
        groups = probs.shape[1] // kv_heads
        rows = []
        for b in range(probs.shape[0]):
            real = [j for j in range(mask.shape[1]) if mask[b, j]]
            keep = keep_of(len(real))
            heads = []
            for h in range(kv_heads):
                protected = protected_of(real, keep)
                score = {j: score_of(probs[b, h * groups : (h + 1) * groups], real, j) for j in real}
                others = sorted((j for j in real if j not in protected), key=lambda j: -score[j])
                heads.append(set(protected) | set(others[: keep - len(protected)]))
            rows.append(heads)
        result[layer] = rows
    return result


def _kept_sets(press, batch, kv_heads):
    out = {}
    for layer, keep in press.kept.items():
        keep = keep.expand(batch, kv_heads, keep.shape[-1])
        out[layer] = [
            [set(torch.nonzero(keep[b, h]).flatten().tolist()) for h in range(kv_heads)] for b in range(batch)
        ]
    return out


def test_h2o_rule(eager_llama):
    t = eager_llama
    inputs = t.make_inputs(t.rows)
    probs = _prompt_probs(t.model, inputs)
    budget = 0.3

    def score(group_probs, real, j):
        # sum over every real query of its probability on key j, averaged over the group's heads
        return (
            sum(float(group_probs[g, i, j]) for g in range(group_probs.shape[0]) for i in real) / group_probs.shape[0]
        )

    ref = _reference_sets(
        probs, inputs, lambda n: int(n * budget + 1e-6), score, lambda real, keep: real[len(real) - keep // 2 :], 2
    )
    with kvpress_mm.get_strategy("h2o", budget=budget)(t.model) as press:
        generate(t.model, inputs, steps=1)
    assert _kept_sets(press, 2, 2) == ref


def test_snapkv_rule(eager_llama):
    t = eager_llama
    inputs = t.make_inputs(t.rows)
    probs = _prompt_probs(t.model, inputs)
    budget, window, kernel = 0.4, 8, 5

    def score(group_probs, real, j):
        queries = real[-window:]
        votes = lambda x: sum(float(group_probs[g, i, x]) for g in range(group_probs.shape[0]) for i in queries)
        # average pooling over the neighbours that exist (count_include_pad=False), padding votes are 0
        length = probs[0].shape[-1]
        neighbours = [x for x in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= x < length]
        return sum(votes(x) for x in neighbours) / len(neighbours) / group_probs.shape[0]

    ref = _reference_sets(
        probs, inputs, lambda n: int(n * budget + 1e-6), score, lambda real, keep: real[-min(window, keep) :], 2
    )
    with kvpress_mm.get_strategy("snapkv", budget=budget, window_size=window, kernel_size=kernel)(t.model) as press:
        generate(t.model, inputs, steps=1)
    assert _kept_sets(press, 2, 2) == ref


@pytest.mark.parametrize("budget,sinks", [(0.25, 4), (0.5, 0), (0.05, 4)])
def test_streaming_llm_rule(budget, sinks):
    t = build_tiny("llama")
    inputs = t.make_inputs(TEXT_ROWS)
    with kvpress_mm.get_strategy("streaming_llm", budget=budget, sinks=sinks)(t.model) as press:
        generate(t.model, inputs, steps=1)
    mask = inputs["attention_mask"]
    for keep in press.kept.values():
        for b in range(2):
            real = torch.nonzero(mask[b]).flatten().tolist()
            n_keep = max(1, int(len(real) * budget + 1e-6))
            n_sinks = min(sinks, n_keep)
            expected = set(real[:n_sinks]) | set(real[len(real) - (n_keep - n_sinks) :])
            assert set(torch.nonzero(keep[b, 0]).flatten().tolist()) == expected
