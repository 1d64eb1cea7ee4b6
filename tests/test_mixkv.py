"""MixKV: importance mixed with key diversity per head, against a plain-loop reference, inside generate()."""

import math

import pytest
import torch
from helpers import generate, masked_reference_generate, rows_for, tiny
from hypothesis import HealthCheck, given, settings
from test_cache_properties import layer_cases, make_layer
from test_sparsemm import _layer, loop_window_votes, tiny_profile, write_profile

import kvpress_mm
from kvpress_mm.head_profiles import ModelIdentity
from kvpress_mm.testing import TINY_FAMILIES

EPS = 1e-8


def loop_mixed_keep(layer, strategy, window, kernel):
    """The MixKV selection of every (row, kv head) by plain loops in float64 (SnapKV base)."""
    b_size, heads, length = layer.batch, layer.kv_heads, layer.length
    keep = torch.zeros(b_size, heads, length, dtype=torch.bool)
    for b in range(b_size):
        real = [j for j in range(length) if layer.valid[b, j]]
        count = int(layer.keep_count[b])
        promised = set(real[-min(count, window) :])
        cands = [j for j in real if j not in promised]
        for h in range(heads):
            votes = loop_window_votes(layer, b, h, window, kernel)
            keys = [layer.keys[b, h, j].double() for j in real]
            units = {j: k / k.norm() for j, k in zip(real, keys)}
            n = len(real)
            center = sum(units.values()) / n
            # the redundancy: the mean cosine of distinct key pairs
            pairs = [float(units[i] @ units[j]) for i in real for j in real if i != j]
            redundancy = min(max(sum(pairs) / len(pairs), 0.0), 1.0) if pairs else 0.0
            a_mean = sum(votes[j] for j in cands) / max(len(cands), 1)

            def rescaled(raw):
                low, high = min(raw[j] for j in cands), max(raw[j] for j in cands)
                unit = {j: (raw[j] - low) / (high - low + EPS) for j in cands}
                mean = sum(unit.values()) / len(cands)
                return {j: unit[j] * a_mean / (mean + EPS) for j in cands}

            diversity = rescaled({j: -float(units[j] @ center) for j in cands}) if cands else {}
            vnorm = rescaled({j: float(layer.values[b, h, j].double().norm()) for j in cands}) if cands else {}
            score = {}
            for j in cands:
                importance = votes[j] + (vnorm[j] if strategy.intrinsic else 0.0)
                if strategy.weighting == "equal":
                    terms = [diversity[j], votes[j]] + ([vnorm[j]] if strategy.intrinsic else [])
                    score[j] = sum(terms) / len(terms)
                else:
                    score[j] = redundancy * diversity[j] + (1 - redundancy) * importance
            chosen = sorted(cands, key=lambda j: -score[j])[: count - len(promised)]
            for j in promised | set(chosen):
                keep[b, h, j] = True
    return keep


@pytest.mark.parametrize("weighting", ["redundancy", "equal"])
@pytest.mark.parametrize("intrinsic", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_plan_matches_loop_reference(weighting, intrinsic, seed):
    window, kernel = 3, 3
    s = kvpress_mm.get_strategy(
        "mixkv",
        budget=0.4,
        weighting=weighting,
        intrinsic=intrinsic,
        base_fields={"window_size": window, "kernel_size": kernel},
    )
    n_valid = torch.tensor([28, 21])
    layer = _layer(2, 2, 2, 28, s.kept_counts(n_valid, 0, 2), pads=(0, 7), seed=seed, window=window)
    keep = s.plan(layer).keep
    assert torch.equal(keep, loop_mixed_keep(layer, s, window, kernel))


def test_redundancy_formula_is_the_mean_pairwise_cosine():
    gen = torch.Generator().manual_seed(3)
    keys = torch.nn.functional.normalize(torch.randn(9, 5, generator=gen, dtype=torch.float64), dim=-1)
    n, center = keys.shape[0], keys.mean(0)
    closed = (n * center.pow(2).sum() - 1) / (n - 1)
    pairs = [float(keys[i] @ keys[j]) for i in range(n) for j in range(n) if i != j]
    assert math.isclose(float(closed), sum(pairs) / len(pairs), rel_tol=1e-12)


@pytest.mark.parametrize("base", ["adakv", "sparsemm"])
def test_headwise_bases_keep_their_budgets(base, tmp_path):
    fields = {"window_size": 3}
    if base == "adakv":
        fields = {"inner_fields": {"window_size": 3}}
    else:
        fields["profile"] = write_profile(tmp_path, ModelIdentity("llava", 2, 2, 4), seed=4)
    s = kvpress_mm.get_strategy("mixkv", budget=0.3, base=base, base_fields=fields)
    assert s.headwise_budgets
    base_strategy = kvpress_mm.get_strategy(base, budget=0.3, **fields)
    n_valid = torch.tensor([30, 22])
    layer = _layer(2, 2, 2, 30, s.kept_counts(n_valid, 1, 2), idx=1, pads=(0, 8), window=3)
    expected = base_strategy.plan(layer).keep.sum(-1)
    assert torch.equal(s.plan(layer).keep.sum(-1), expected)
    assert expected[:, 0].tolist() != expected[:, 1].tolist()  # uneven heads, re-ranked within each


@pytest.mark.parametrize("base", ["snapkv", "adakv", "h2o"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layer_cases())
def test_plan_invariants(base, case):
    s = kvpress_mm.get_strategy("mixkv", base=base, budget=case[8], budget_tokens=case[9])
    layer = make_layer(case, s)
    keep = s.plan(layer).keep
    base_keep = s._base.plan(layer).keep.expand_as(keep)
    assert torch.equal(keep.sum(-1), base_keep.sum(-1))
    assert not bool((keep & ~layer.valid[:, None, :]).any())
    promised = s.promised(layer)
    if promised is not None:
        assert bool((keep | ~promised[:, None, :]).all())


def test_bad_bases_are_refused():
    for base, named in (("mixkv", "not mixkv itself"), ("full", "no scores"), ("nope", "'nope'")):
        with pytest.raises(ValueError, match=named):
            kvpress_mm.get_strategy("mixkv", base=base)
    with pytest.raises(ValueError, match="base_fields must not set budget"):
        kvpress_mm.get_strategy("mixkv", base_fields={"budget": 0.1})


# ---------------------------------------------------------------- inside generate()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_eviction_equals_masked_full_cache(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    with kvpress_mm.get_strategy("mixkv", budget=0.3, base_fields={"window_size": 4})(t.model) as press:
        tokens, logits = generate(t.model, inputs, steps=5)
    assert press.compressed_any
    kept = dict(press.kept)
    ref_tokens, ref_logits = masked_reference_generate(t.model, inputs, kept, steps=5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("base", ["adakv", "sparsemm"])
def test_on_headwise_bases_in_generate(base, tmp_path):
    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t))
    fields = {"inner_fields": {"window_size": 4}} if base == "adakv" else {"window_size": 4}
    if base == "sparsemm":
        auto = kvpress_mm.get_strategy("mixkv", budget=0.3, base=base, base_fields=fields)
        with pytest.raises(ValueError, match="kvpress-mm profile-heads"):
            auto(t.model)  # the base's profile is looked up when MixKV enters the model
        fields["profile"] = tiny_profile("llava", tmp_path)
    with kvpress_mm.get_strategy("mixkv", budget=0.3, base=base, base_fields=fields)(t.model) as press:
        tokens, logits = generate(t.model, inputs, steps=4)
    kept = dict(press.kept)
    ref_tokens, ref_logits = masked_reference_generate(t.model, inputs, kept, steps=4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert any(k.sum(-1)[0, 0] != k.sum(-1)[0, 1] for k in kept.values())
