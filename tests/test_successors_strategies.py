"""vl_cache, aircache, meda, madakv against references computed another way: the model's eager attention
probabilities, and the papers' algorithms written as plain Python loops (budgets, scores, selection).

The tiny llava model (2 layers, 4 query heads over 2 kv heads) with a left-padded batch of two interleaved
image + text rows; the strategies run with sdpa inside generate(), so their statistics come from the chunked
passes, the references from the eager probabilities.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import MIXED_ROWS, generate
from transformers import DynamicCache

import kvpress_mm
from kvpress_mm.adapters import adapter_for
from kvpress_mm.merge import merge_evicted
from kvpress_mm.modality import Modality
from kvpress_mm.testing import build_tiny

TXT, IMG, VID, PAD = int(Modality.TEXT), int(Modality.IMAGE), int(Modality.VIDEO), int(Modality.PAD)
ROWS = [MIXED_ROWS[0], [("text", 6), ("image",), ("text", 20), ("image",), ("text", 8)]]


@pytest.fixture(scope="module")
def llava():
    t = build_tiny("llava")
    inputs = t.make_inputs(ROWS)
    model = t.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True, use_cache=True)
    finally:
        model.set_attn_implementation("sdpa")
    probs = [a.double() for a in out.attentions]
    keys = [layer.keys.float() for layer in out.past_key_values.layers]
    values = [layer.values.float() for layer in out.past_key_values.layers]
    labels = adapter_for(model).modality(model, inputs["input_ids"], inputs["attention_mask"], inputs)
    return t, inputs, probs, keys, values, labels.tolist()


def _run(t, inputs, name, **fields):
    cache = DynamicCache(config=t.model.config.get_text_config())
    with kvpress_mm.get_strategy(name, **fields)(t.model) as press:
        generate(t.model, inputs, steps=1, cache=cache)
    return press, cache


def _kept(press, layer, row, head):
    keep = press.kept[layer]
    return set(torch.nonzero(keep[row, min(head, keep.shape[1] - 1)]).flatten().tolist())


def _uniform(n, budget):
    return max(1, min(n, int(math.floor(n * budget + 1e-6))))


def _split(weights, total, high, low):
    """Python water-filling: integer shares of total ~ weights within [low, high], largest remainders first."""
    n = len(weights)
    w = [max(float(x), 0.0) for x in weights]
    if sum(w) == 0:
        w = [1.0] * n
    total = min(max(total, sum(low)), sum(high))
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(n) if i not in fixed]
        rest = total - sum(fixed.values())
        positive = sum(w[i] for i in free)
        x = {i: rest * w[i] / positive if positive else rest / len(free) for i in free}
        moved = False
        for i in free:
            if x[i] > high[i]:
                fixed[i], moved = high[i], True
            elif x[i] < low[i]:
                fixed[i], moved = low[i], True
        if not moved:
            break
    exact = [fixed.get(i, x.get(i)) for i in range(n)]
    exact = [round(e) if abs(e - round(e)) < 1e-6 else e for e in exact]
    counts = [int(math.floor(e)) for e in exact]
    order = sorted((i for i in range(n) if counts[i] < high[i]), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _layers(weights_per_layer, n, budget, share=0.0):
    """Per-layer counts of one row: n_layers x uniform in all, ~ weights mixed with the uniform share."""
    layers = len(weights_per_layer)
    total = sum(weights_per_layer)
    w = [share / layers + (1 - share) * (x / total if total > 0 else 1 / layers) for x in weights_per_layer]
    return _split(w, layers * _uniform(n, budget), [n] * layers, [1] * layers)


def _top(scores: dict, count: int, first=()):
    """The count best positions of scores (positions in `first` rank before all others)."""
    ranked = sorted(scores, key=lambda j: (j not in first, -scores[j]))
    return set(ranked[:count])


def _real(labels, row):
    return [j for j, m in enumerate(labels[row]) if m != PAD]


def _group_mean(values_per_head, kv_head, groups):
    return sum(values_per_head[kv_head * groups + g] for g in range(groups)) / groups


# ------------------------------------------------------------------------------------------------ VL-Cache


@pytest.mark.parametrize("uniform_share", [0.0, 0.5])
def test_vl_cache_equals_python(llava, uniform_share):
    t, inputs, probs, _, _, labels = llava
    budget, threshold = 0.3, 0.05
    press, _ = _run(t, inputs, "vl_cache", budget=budget, sparsity_threshold=threshold, uniform_share=uniform_share)
    heads, groups = probs[0].shape[1], probs[0].shape[1] // 2
    for row in range(2):
        real = _real(labels, row)
        vision = [j for j in real if labels[row][j] in (IMG, VID)]
        post = [j for j in real if labels[row][j] == TXT and (not vision or j > max(vision))]
        density = []
        for p in probs:
            below = seen = 0
            for h in range(heads):
                for i in post:
                    visible = [j for j in real if j <= i]
                    top = max(float(p[row, h, i, j]) for j in visible)
                    below += sum(float(p[row, h, i, j]) < threshold * top for j in visible)
                    seen += len(visible)
            density.append(1 - below / seen)
        counts = _layers(density, len(real), budget, uniform_share)
        for layer, p in enumerate(probs):
            for kv in range(2):
                score = {
                    j: _group_mean([sum(float(p[row, h, i, j]) for i in post) for h in range(heads)], kv, groups)
                    for j in real
                }
                assert _kept(press, layer, row, kv) == _top(score, counts[layer]), (row, layer, kv)


# ------------------------------------------------------------------------------------------------ AirCache


def _elite_rows(p, labels, row, window, threshold):
    """Python elite window of one layer: the last text query's head-averaged softmax over the text keys."""
    real = _real(labels, row)
    text = [j for j in real if labels[row][j] == TXT]
    ref = text[-1]
    heads = p.shape[1]
    keys = [j for j in text if j <= ref]
    rel = {j: 0.0 for j in keys}
    for h in range(heads):
        mass = sum(float(p[row, h, ref, j]) for j in keys)
        for j in keys:
            rel[j] += float(p[row, h, ref, j]) / mass / heads
    top = max(rel.values())
    elite = [j for j in keys if rel[j] >= threshold * top]
    return sorted(sorted(elite, key=lambda j: -rel[j])[:window])


@pytest.mark.parametrize("text_first", [True, False])
def test_aircache_equals_python(llava, text_first):
    t, inputs, probs, _, _, labels = llava
    budget, window, threshold = 0.3, 6, 0.2
    press, _ = _run(
        t, inputs, "aircache", budget=budget, window_size=window, relevancy_threshold=threshold, text_first=text_first
    )
    heads, groups = probs[0].shape[1], probs[0].shape[1] // 2
    for row in range(2):
        real = _real(labels, row)
        vision = [j for j in real if labels[row][j] in (IMG, VID)]
        text = [j for j in real if labels[row][j] == TXT]
        summaries, per_layer = [], []
        for p in probs:
            elite = _elite_rows(p, labels, row, window, threshold)
            subset = set(vision) | set(elite)
            restricted = [[0.0] * p.shape[-1] for _ in range(heads)]
            raw = [[0.0] * p.shape[-1] for _ in range(heads)]
            for h in range(heads):
                for i in elite:
                    mass = sum(float(p[row, h, i, j]) for j in subset)
                    for j in real:
                        raw[h][j] += float(p[row, h, i, j]) / len(elite)
                        if j in subset:
                            restricted[h][j] += float(p[row, h, i, j]) / mass / len(elite)
            importance = [sum(restricted[h][j] for h in range(heads)) / heads for j in vision]
            n = len(importance)
            mean = sum(importance) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in importance) / (n - 1))
            skew = n / ((n - 1) * (n - 2)) * sum(((x - mean) / std) ** 3 for x in importance)
            summaries.append((sum(importance), max(skew, 0.0)))
            per_layer.append((restricted, raw))
        strength_total = sum(s for s, _ in summaries)
        skew_total = sum(k for _, k in summaries)
        weights = [
            ((s / strength_total if strength_total else 0.5) + (k / skew_total if skew_total else 0.5)) / 2
            for s, k in summaries
        ]
        counts = _layers(weights, len(real), budget)
        for layer, (restricted, raw) in enumerate(per_layer):
            for kv in range(2):
                r = {j: _group_mean([restricted[h][j] for h in range(heads)], kv, groups) for j in real}
                w = {j: _group_mean([raw[h][j] for h in range(heads)], kv, groups) for j in real}
                if text_first:
                    score = {j: (r[j] if j in vision else w[j]) for j in real}
                    expected = _top(score, counts[layer], first=set(text))
                else:
                    expected = _top(w, counts[layer])
                assert _kept(press, layer, row, kv) == expected, (row, layer, kv)


# ------------------------------------------------------------------------------------------------ MEDA


def _restricted_entropy(dist):
    mass = sum(dist)
    if mass <= 0:
        return None
    return -sum(x / mass * math.log(x / mass) for x in dist if x > 0)


@pytest.mark.parametrize(
    "entropy,ranking", [("cross_modal", "accumulated"), ("all", "accumulated"), ("cross_modal", "window")]
)
def test_meda_equals_python(llava, entropy, ranking):
    t, inputs, probs, keys, values, labels = llava
    budget = 0.3
    window = {"ranking": "window", "window_size": 8} if ranking == "window" else {}
    press, cache = _run(t, inputs, "meda", budget=budget, entropy=entropy, **window)
    heads, groups = probs[0].shape[1], probs[0].shape[1] // 2
    valid = inputs["attention_mask"].bool()
    for row in range(2):
        real = _real(labels, row)
        vision = [j for j in real if labels[row][j] in (IMG, VID)]
        text = [j for j in real if labels[row][j] == TXT]
        energies = []
        for p in probs:
            per_head = []
            for h in range(heads):

                def mean_entropy(queries, key_set, p=p, h=h):
                    values_ = [_restricted_entropy([float(p[row, h, i, j]) for j in key_set]) for i in queries]
                    values_ = [x for x in values_ if x is not None]
                    return sum(values_) / len(values_) if values_ else 0.0

                if entropy == "all":
                    per_head.append(mean_entropy(real, real))
                else:
                    per_head.append(mean_entropy(text, vision) + mean_entropy(vision, text))
            energies.append(sum(per_head) / heads)
        top = max(energies)
        weights = [math.exp(e - top) for e in energies]
        counts = _layers(weights, len(real), budget)
        for layer, p in enumerate(probs):
            keep = counts[layer]
            recent = set(real[len(real) - int(math.floor(keep * 0.5 + 1e-12)) :]) if keep >= 2 else set()
            for kv in range(2):
                voters = real if ranking == "accumulated" else real[-8:]
                score = {
                    j: _group_mean([sum(float(p[row, h, i, j]) for i in voters) for h in range(heads)], kv, groups)
                    for j in real
                }
                ranked = sorted((j for j in real if j not in recent), key=lambda j: (j not in text, -score[j]))
                expected = recent | set(ranked[: keep - len(recent)])
                assert _kept(press, layer, row, kv) == expected, (row, layer, kv)
    # the kept slots hold the evicted tokens averaged into their most similar kept key (LOOK-M's merge)
    for layer in range(len(probs)):
        keep = press.kept[layer].expand(2, 2, -1)
        merged_k, merged_v = merge_evicted(keys[layer], values[layer], keep, valid, "averaged")
        stored = cache.layers[layer]
        for row in range(2):
            for kv in range(2):
                positions = torch.nonzero(keep[row, kv]).flatten()
                n = positions.numel()
                slots = stored.keys.shape[2] - n  # rows are left-padded to the largest kept count
                got_k = stored.keys[row, kv, slots : slots + n].float()
                torch.testing.assert_close(got_k, merged_k[row, kv, positions], atol=1e-5, rtol=1e-5)
                got_v = stored.values[row, kv, slots : slots + n].float()
                torch.testing.assert_close(got_v, merged_v[row, kv, positions], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ MadaKV


@pytest.mark.parametrize("compensation", ["sequential", "proportional"])
def test_madakv_equals_python(llava, compensation):
    t, inputs, probs, _, _, labels = llava
    budget, window, coverage = 0.3, 8, 0.6
    press, _ = _run(
        t, inputs, "madakv", budget=budget, window_size=window, coverage=coverage, compensation=compensation
    )
    heads, groups = probs[0].shape[1], probs[0].shape[1] // 2
    length = len(labels[0])
    for row in range(2):
        real = _real(labels, row)
        members = {
            "text": [j for j in real if labels[row][j] == TXT],
            "vision": [j for j in real if labels[row][j] in (IMG, VID)],
        }
        proxy = [j for j in range(length - window, length) if labels[row][j] != PAD]
        layers = []
        for p in probs:
            psi = [
                {
                    j: _group_mean([sum(float(p[row, h, i, j]) for i in proxy) for h in range(heads)], kv, groups)
                    for j in real
                }
                for kv in range(2)
            ]
            demand, weight = [], []
            for kv in range(2):
                per = {}
                for m, tokens in members.items():
                    total = sum(psi[kv][j] for j in tokens)
                    ranked = sorted((psi[kv][j] for j in tokens), reverse=True)
                    k, acc = 0, 0.0
                    while k < len(ranked) and acc < coverage * total * (1 - 1e-6):
                        acc += ranked[k]
                        k += 1
                    per[m] = (k if total > 0 else 0, total)
                demand.append(per["text"][0] + per["vision"][0])
                weight.append((per["text"][1], per["vision"][1]))
            layers.append((psi, demand, weight))
        uniform = _uniform(len(real), budget)
        d = [sum(demand) / 2 for _, demand, _ in layers]
        if compensation == "proportional":
            counts = _layers(d, len(real), budget)
        else:
            left, counts = uniform * len(d), []
            for layer, x in enumerate(d):
                after = len(d) - layer - 1
                c = min(max(round(x), max(left - after * len(real), 1)), min(left - after, len(real)))
                c = left if after == 0 else c
                counts.append(c)
                left -= c
        for layer, (psi, demand, weight) in enumerate(layers):
            heads_budget = _split(demand, counts[layer] * 2, [len(real)] * 2, [1, 1])
            for kv in range(2):
                sizes = [len(members["text"]), len(members["vision"])]
                n_text, n_vision = _split(list(weight[kv]), heads_budget[kv], sizes, [0, 0])
                expected = _top({j: psi[kv][j] for j in members["text"]}, n_text)
                expected |= _top({j: psi[kv][j] for j in members["vision"]}, n_vision)
                assert _kept(press, layer, row, kv) == expected, (row, layer, kv)
        assert [int(press.kept[layer][row].sum()) for layer in range(len(d))] == [2 * c for c in counts]
