"""SparseMM: head-wise budgets from a head profile, against plain-loop references, inside generate()."""

import math
import tempfile
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from helpers import generate, masked_reference_generate, rows_for, tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvpress_mm.strategies.sparsemm import apportion
from test_cache_properties import layer_cases, make_layer

import kvpress_mm
from kvpress_mm.head_profiles import HeadProfile, ModelIdentity, find_profile
from kvpress_mm.layer import LayerKV
from kvpress_mm.modality import Modality
from kvpress_mm.testing import TINY_FAMILIES

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write_profile(folder, identity: ModelIdentity, seed=0, power=4.0) -> str:
    """A peaked random profile (a few heads dominate, as visual heads do) for `identity`, saved in `folder`."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(identity.num_layers, identity.num_query_heads, generator=gen, dtype=torch.float64) ** power
    path = Path(folder) / f"profile_{identity.model_type}_{identity.num_layers}_{seed}.json"
    return str(HeadProfile(identity, scores, {"made": "test"}).save(path))


def tiny_profile(family, folder, seed=0) -> str:
    return write_profile(folder, ModelIdentity.of(tiny(family).model), seed)


# ---------------------------------------------------------------- the apportioning rule, in exact arithmetic


def loopapportion(total, weights, floor, cap):
    """Water filling with Fractions, then largest remainders (ties: lower index), one item at a time."""
    n = len(weights)
    free = list(range(n))
    x = [Fraction(floor)] * n
    fixed = {}
    while True:
        pool = Fraction(total) - sum(Fraction(cap) for _ in fixed) - floor * len(free)
        w_sum = sum(Fraction(weights[i]) for i in free)
        for i in free:
            share = Fraction(weights[i]) / w_sum if w_sum > 0 else Fraction(1, len(free))
            x[i] = floor + share * pool
        over = [i for i in free if x[i] > cap]
        if not over:
            break
        for i in over:
            fixed[i] = cap
            x[i] = Fraction(cap)
        free = [i for i in free if i not in over]
    whole = [math.floor(v) for v in x]
    missing = total - sum(whole)
    order = sorted(range(n), key=lambda i: (-(x[i] - whole[i]) if whole[i] < cap else 1, i))
    for i in order[:missing]:
        whole[i] += 1
    return whole


@SETTINGS
@given(
    n=st.integers(1, 12),
    data=st.data(),
)
def testapportion_matches_exact_loop_reference(n, data):
    _check_apportion(n, data.draw)


def test_apportion_breaks_exact_ties_by_index_despite_float_rounding():
    # the remainders of items 1 and 3 are both exactly 4/7; in float64 they differed in the last bit
    draws = iter([18, 5, 70, 0, 0.125, 0.25, 1.0, 3.0, 0.125, 0.25])
    _check_apportion(7, lambda _strategy: next(draws))


def _check_apportion(n, draw):
    cap = draw(st.integers(0, 60))
    floor = draw(st.integers(0, cap))
    total = draw(st.integers(n * floor, n * cap))
    # weights with zeros and ties (dyadic values: exact in float64; the shares need not be)
    weights = [draw(st.sampled_from([0, 0.0625, 0.125, 0.25, 0.5, 1.0, 3.0])) for _ in range(n)]
    got = apportion(torch.tensor([total]), torch.tensor(weights), torch.tensor([floor]), torch.tensor([cap]))
    expected = loopapportion(total, weights, floor, cap)
    assert got[0].tolist() == expected
    assert sum(expected) == total and all(floor <= v <= cap for v in expected)


# ---------------------------------------------------------------- budgets: the release's formula


def test_head_budgets_follow_the_release_formula_when_it_gives_whole_tokens(tmp_path):
    """k = 40 per head, window 8, uniform_share 0.25 -> m = 8, R = 24 per head; 2 layers x 2 kv heads pool 96
    tokens: head budgets w + m + s * 96 with s = (1/2, 1/4, 1/8, 1/8) -> 64, 40, 28, 28."""
    identity = ModelIdentity("llava", 2, 2, 2)
    scores = torch.tensor([[0.5, 0.25], [0.125, 0.125]], dtype=torch.float64)  # one query head per kv head
    path = HeadProfile(identity, scores).save(tmp_path / "p.json")
    s = kvpress_mm.get_strategy("sparsemm", budget_tokens=40, profile=str(path), window_size=8, uniform_share=0.25)
    n_valid = torch.tensor([100])
    layers = s.layer_budgets(n_valid, 2)
    assert layers[:, 0].tolist() == [(64 + 40) // 2, (28 + 28) // 2]
    for idx, expected in ((0, [64, 40]), (1, [28, 28])):
        layer = _layer(batch=1, kv_heads=2, groups=1, length=100, keep=layers[idx], idx=idx, num_layers=2)
        assert s.head_budgets(layer)[0].tolist() == expected
        keep = s.plan(layer).keep
        assert keep.sum(-1)[0].tolist() == expected


def test_allocation_layer_keeps_the_flat_budget_per_layer(tmp_path):
    path = write_profile(tmp_path, ModelIdentity("llava", 3, 2, 4))
    s = kvpress_mm.get_strategy("sparsemm", budget=0.5, profile=path, allocation="layer")
    assert [s.kept_counts(torch.tensor([40, 31]), i, 3).tolist() for i in range(3)] == [[20, 15]] * 3
    model = kvpress_mm.get_strategy("sparsemm", budget=0.5, profile=path, window_size=4)
    per_layer = torch.stack([model.kept_counts(torch.tensor([40, 31]), i, 3) for i in range(3)])
    assert per_layer.sum(0).tolist() == [60, 45] and per_layer[:, 0].unique().numel() > 1


# ---------------------------------------------------------------- the plan against plain loops


def _layer(batch, kv_heads, groups, length, keep, idx=0, num_layers=2, pads=(), seed=0, head_dim=4, window=8):
    from kvpress_mm.attention_stats import window_attention

    gen = torch.Generator().manual_seed(seed)
    modality = torch.zeros(batch, length, dtype=torch.int8)
    modality[:, length // 3 : length // 2] = int(Modality.IMAGE)
    for b, pad in enumerate(pads):
        modality[b, :pad] = int(Modality.PAD)
    valid = modality != int(Modality.PAD)
    heads = kv_heads * groups
    q = torch.randn(batch, heads, length, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    stats = window_attention(q, k, head_dim**-0.5, window, allowed, valid)
    layer = LayerKV(idx, num_layers, k, v, modality, torch.as_tensor(keep), heads, window_attention=stats)
    layer.queries = q  # for the references
    return layer


def loop_window_votes(layer, b, h, window, kernel):
    """SnapKV's votes of kv head h, from the queries by plain loops in float64: softmax rows of the last
    `window` real queries summed, averaged over the query group, then averaged over a kernel-wide window."""
    q, k, valid = layer.queries.double(), layer.keys.double(), layer.valid[b].tolist()
    real = [j for j in range(layer.length) if valid[j]]
    groups = layer.groups
    votes = [0.0] * layer.length
    for g in range(groups):
        qh = h * groups + g
        for i in real[-window:]:
            seen = [j for j in real if j <= i]
            logits = [float(q[b, qh, i] @ k[b, h, j]) / math.sqrt(q.shape[-1]) for j in seen]
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            for j, e in zip(seen, exps):
                votes[j] += e / sum(exps) / groups
    half = kernel // 2
    pooled = []
    for j in range(layer.length):
        span = [votes[t] for t in range(max(0, j - half), min(layer.length, j + half + 1))]
        pooled.append(sum(span) / len(span))
    return pooled


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_matches_loop_reference(tmp_path, seed):
    window, kernel = 3, 3
    identity = ModelIdentity("llava", 2, 2, 4)
    path = write_profile(tmp_path, identity, seed=seed)
    s = kvpress_mm.get_strategy(
        "sparsemm", budget=0.4, profile=path, window_size=window, kernel_size=kernel, uniform_share=0.2
    )
    n_valid = torch.tensor([30, 24])
    for idx in range(2):
        keep_count = s.kept_counts(n_valid, idx, 2)
        layer = _layer(2, 2, 2, 30, keep_count, idx=idx, pads=(0, 6), seed=seed, window=window)
        keep = s.plan(layer).keep
        profile = HeadProfile.load(path)
        kv = profile.kv_scores()
        for b in range(2):
            n = int(n_valid[b])
            flat = math.floor(0.4 * n)
            w = min(flat, window)
            m = math.floor((flat - w) * 0.2)
            # per layer: the model-wide pool by the layers' score mass; then each head by its own score
            layer_avg = loopapportion(2 * flat, kv.sum(-1).tolist(), w + m, n)
            assert int(keep_count[b]) == layer_avg[idx]
            budgets = loopapportion(2 * layer_avg[idx], kv[idx].tolist(), w + m, n)
            real = [j for j in range(30) if layer.valid[b, j]]
            promised = set(real[-min(layer_avg[idx], window) :])
            for h in range(2):
                votes = loop_window_votes(layer, b, h, window, kernel)
                others = sorted((j for j in real if j not in promised), key=lambda j: -votes[j])
                expected = promised | set(others[: budgets[h] - len(promised)])
                assert set(torch.nonzero(keep[b, h]).flatten().tolist()) == expected, (idx, b, h)


@pytest.mark.parametrize("allocation", ["model", "layer"])
@SETTINGS
@given(case=layer_cases())
def test_plan_invariants(allocation, case):
    batch, kv_heads, groups = case[0], case[1], case[2]
    with tempfile.TemporaryDirectory() as folder:
        path = write_profile(folder, ModelIdentity("llava", 4, kv_heads, kv_heads * groups), seed=case[-1])
        s = kvpress_mm.get_strategy(
            "sparsemm", budget=case[8], budget_tokens=case[9], profile=path, allocation=allocation
        )
        layer = make_layer(case, s)
        keep = s.plan(layer).keep
    assert keep.shape == (batch, kv_heads, layer.length) and keep.dtype == torch.bool
    assert not bool((keep & ~layer.valid[:, None, :]).any())
    assert torch.equal(keep.sum(-1).sum(-1), layer.keep_count * kv_heads)
    assert bool((keep | ~s.promised(layer)[:, None, :]).all())


# ---------------------------------------------------------------- profiles: found, checked, refused


def test_no_profile_is_a_clear_error_naming_the_command():
    t = tiny("llava")
    with pytest.raises(ValueError) as err:
        with kvpress_mm.get_strategy("sparsemm", budget=0.3)(t.model):
            pass
    message = str(err.value)
    assert "kvpress-mm profile-heads" in message and "no head profile" in message and "'llava'" in message
    # nothing evicted, nothing to look up
    with kvpress_mm.get_strategy("sparsemm", budget=1.0)(t.model):
        generate(t.model, t.make_inputs(rows_for(t)), steps=2)


def test_a_profile_of_another_model_is_refused_naming_the_mismatch(tmp_path):
    path = write_profile(tmp_path, ModelIdentity("llava", 5, 2, 4))
    with pytest.raises(ValueError) as err:
        with kvpress_mm.get_strategy("sparsemm", budget=0.3, profile=path)(tiny("llava").model):
            pass
    message = str(err.value)
    assert "num_layers (5 in the profile, 2 in the model)" in message and "kvpress-mm profile-heads" in message


def test_a_bad_profile_path_fails_at_construction():
    with pytest.raises(ValueError, match="profile.*does not exist"):
        kvpress_mm.get_strategy("sparsemm", profile="/no/such/profile.json")


def test_auto_outside_a_model_says_what_to_do():
    s = kvpress_mm.get_strategy("sparsemm", budget=0.5)
    layer = _layer(1, 2, 2, 20, torch.tensor([10]))
    with pytest.raises(ValueError, match="profile=<head profile file>"):
        s.plan(layer)


def test_mini_llava_profile_is_found_by_identity():
    profile = find_profile(ModelIdentity("llava", 30, 3, 9))
    assert profile.model.name == "mini_llava" and profile.scores.shape == (30, 9)
    assert float(profile.scores.sum()) > 0


# ---------------------------------------------------------------- inside generate()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_eviction_equals_masked_full_cache(family, tmp_path):
    """Padded multimodal batch: decode logits equal the full cache's with the evicted positions masked, the
    heads keep their uneven budgets and the layer holds its largest head."""
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    s = kvpress_mm.get_strategy("sparsemm", budget=0.3, window_size=4, profile=tiny_profile(family, tmp_path))
    with s(t.model) as press:
        tokens, logits = generate(t.model, inputs, steps=5)
    assert press.compressed_any
    kept = dict(press.kept)
    ref_tokens, ref_logits = masked_reference_generate(t.model, inputs, kept, steps=5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    n_valid = inputs["attention_mask"].sum(-1)
    for idx, keep in kept.items():
        counts = keep.sum(-1)
        per_row = s.kept_counts(n_valid, idx, len(press.attention_modules)).to(counts.device)
        assert torch.equal(counts.sum(-1), per_row * keep.shape[1])
        assert press.report.layers[idx].after_tokens == int(counts.max())


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_rows_equal_single_rows(family, tmp_path):
    t = tiny(family)
    rows = rows_for(t)
    s = kvpress_mm.get_strategy("sparsemm", budget=0.4, window_size=4, profile=tiny_profile(family, tmp_path))
    batch, single = t.make_inputs(rows), t.make_inputs(rows[:1])
    with s(t.model):
        _, batch_logits = generate(t.model, batch, steps=4)
    with s(t.model):
        _, row_logits = generate(t.model, single, steps=4)
    torch.testing.assert_close(batch_logits[:1], row_logits, atol=1e-4, rtol=0)


def test_sliding_window_layers_take_no_share(tmp_path):
    """gemma3's sliding layers stay uncompressed: the model-wide pool goes to its full-attention layers."""
    t = tiny("gemma3")
    s = kvpress_mm.get_strategy("sparsemm", budget=0.3, profile=tiny_profile("gemma3", tmp_path))
    s.bind(t.model)
    budgets = s.layer_budgets(torch.tensor([50]), 4)
    types = t.model.config.get_text_config().layer_types
    full = [i for i, kind in enumerate(types) if kind == "full_attention"]
    assert full and int(budgets[full, 0].sum()) == math.floor(0.3 * 50) * len(full)
