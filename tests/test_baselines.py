"""tova, knorm, random, pyramidkv, adakv: selection rules against references computed another way."""

import pytest
import torch
from helpers import TEXT_ROWS, generate

import kvpress_mm
from kvpress_mm.testing import build_tiny


@pytest.fixture(scope="module")
def llama():
    return build_tiny("llama")


def _eager_probs(model, inputs):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return [a.float() for a in model(**inputs, output_attentions=True).attentions]
    finally:
        model.set_attn_implementation("sdpa")


def _full_cache_keys(model, inputs):
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
    return [layer.keys.float() for layer in cache.layers]


def _kept(press, layer, b, h=0):
    keep = press.kept[layer]
    return set(torch.nonzero(keep[b, min(h, keep.shape[1] - 1)]).flatten().tolist())


def test_tova_rule(llama):
    inputs = llama.make_inputs(TEXT_ROWS)
    probs = _eager_probs(llama.model, inputs)
    mask = inputs["attention_mask"]
    with kvpress_mm.get_strategy("tova", budget=0.3)(llama.model) as press:
        generate(llama.model, inputs, steps=1)
    for layer, p in enumerate(probs):
        for b in range(2):
            real = torch.nonzero(mask[b]).flatten().tolist()
            keep = int(len(real) * 0.3)
            last = real[-1]
            score = {j: sum(float(p[b, h, last, j]) for h in range(p.shape[1])) for j in real}
            others = sorted((j for j in real if j != last), key=lambda j: -score[j])
            assert _kept(press, layer, b) == {last} | set(others[: keep - 1])


def test_knorm_rule(llama):
    inputs = llama.make_inputs(TEXT_ROWS)
    keys = _full_cache_keys(llama.model, inputs)
    mask = inputs["attention_mask"]
    with kvpress_mm.get_strategy("knorm", budget=0.25)(llama.model) as press:
        generate(llama.model, inputs, steps=1)
    for layer, k in enumerate(keys):
        for b in range(2):
            real = torch.nonzero(mask[b]).flatten().tolist()
            for h in range(k.shape[1]):
                norms = {j: float(k[b, h, j].norm()) for j in real}
                expected = set(sorted(real, key=lambda j: norms[j])[: int(len(real) * 0.25)])
                assert _kept(press, layer, b, h) == expected


def test_random_is_seeded_and_uniformish(llama):
    inputs = llama.make_inputs(TEXT_ROWS)
    runs = []
    for seed in (0, 0, 1):
        with kvpress_mm.get_strategy("random", budget=0.5, seed=seed)(llama.model) as press:
            generate(llama.model, inputs, steps=1)
        runs.append({k: v.clone() for k, v in press.kept.items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    # the kept positions are spread over the prompt, not a window
    kept = torch.nonzero(runs[0][0][0, 0]).flatten()
    real_start = int((inputs["attention_mask"][0] == 0).sum())
    assert kept.min() < real_start + 12 and kept.max() > real_start + 36


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.8])
def test_pyramid_budgets(budget):
    strategy = kvpress_mm.get_strategy("pyramidkv", budget=budget)
    n_valid = torch.tensor([200, 57, 9])
    flat = kvpress_mm.get_strategy("snapkv", budget=budget).kept_counts(n_valid, 0, 8)
    budgets = torch.stack([strategy.kept_counts(n_valid, layer, 8) for layer in range(8)])
    assert torch.equal(budgets.sum(0), flat * 8)  # same total as the flat budget
    assert bool((budgets[:-1] >= budgets[1:]).all())  # non-increasing with depth
    assert bool((budgets >= 1).all()) and bool((budgets <= n_valid).all())
    assert bool((budgets[0] > budgets[-1])[flat > 1].all())  # a real pyramid wherever there is room


def test_pyramid_in_generate_uses_layer_budgets():
    t = build_tiny("qwen2_vl")  # 3 layers
    inputs = t.make_inputs([[("text", 50), ("image",), ("text", 30)]])
    strategy = kvpress_mm.get_strategy("pyramidkv", budget=0.2, window_size=4)
    with strategy(t.model) as press:
        generate(t.model, inputs, steps=2)
    n = inputs["attention_mask"].sum(-1)
    expected = [int(strategy.kept_counts(n, layer, 3)[0]) for layer in range(3)]
    assert press.report.after_tokens == expected
    assert expected[0] > expected[2]


def test_adakv_rule(llama):
    """Head-wise: each head keeps its floor of best tokens, the rest of the layer's slots go to the best pairs."""
    inputs = llama.make_inputs(TEXT_ROWS)
    probs = _eager_probs(llama.model, inputs)
    budget, window, alpha = 0.3, 4, 0.25
    strategy = kvpress_mm.get_strategy(
        "adakv",
        budget=budget,
        inner="snapkv",
        inner_fields={"window_size": window, "kernel_size": 1},
        alpha_safeguard=alpha,
    )
    with strategy(llama.model) as press:
        generate(llama.model, inputs, steps=1)
    mask = inputs["attention_mask"]
    for layer, p in enumerate(probs):
        assert press.kept[layer].shape[1] == 2
        for b in range(2):
            real = torch.nonzero(mask[b]).flatten().tolist()
            keep = int(len(real) * budget + 1e-6)
            win = real[-min(window, keep) :]
            score = {
                (h, j): sum(float(p[b, g, i, j]) for g in (2 * h, 2 * h + 1) for i in win) / 2
                for h in range(2)
                for j in real
            }
            chosen = set()
            for h in range(2):
                floor = max(int(keep * alpha), len(win))
                ranked = sorted(real, key=lambda j: (j not in win, -score[(h, j)]))
                chosen |= {(h, j) for j in ranked[:floor]}
            rest = sorted((pair for pair in score if pair not in chosen), key=lambda pair: -score[pair])
            chosen |= set(rest[: keep * 2 - len(chosen)])
            for h in range(2):
                assert _kept(press, layer, b, h) == {j for hh, j in chosen if hh == h}
    # the physical cache holds the largest head's count; smaller heads are masked, not padded with data
    for layer, report in press.report.layers.items():
        assert report.after_tokens == int(press.kept[layer].sum(-1).max())
