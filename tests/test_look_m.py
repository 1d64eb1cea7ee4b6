"""LOOK-M: text-prior selection and the three merges, against plain-loop references."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cache_properties import layer_cases, make_layer

import kvpress_mm
from kvpress_mm.merge import merge_evicted
from kvpress_mm.modality import Modality


def loop_merge(keys, values, keep, valid, mode, labels=None):
    """The merge formulas of the paper, one evicted token at a time, in float64."""
    b_size, heads, length, _ = keys.shape
    keys, values = keys.double(), values.double()
    out_k, out_v = keys.clone(), values.clone()
    keep = keep.expand(b_size, heads, length)
    for b in range(b_size):
        for h in range(heads):
            kept = [j for j in range(length) if keep[b, h, j]]
            evicted = [e for e in range(length) if valid[b, e] and not keep[b, h, e]]
            match = {}
            for e in evicted:
                cands = [j for j in kept if labels is None or labels[b, j] == labels[b, e]]
                if not cands:
                    continue
                sims = [
                    torch.nn.functional.cosine_similarity(keys[b, h, e], keys[b, h, j], dim=0).item() for j in cands
                ]
                best = max(range(len(cands)), key=lambda i: sims[i])
                match[e] = (cands[best], sims[best])
            weights = {e: 1.0 for e in match}
            if mode == "weighted" and match:
                mean = sum(s for _, s in match.values()) / len(match)
                weights = {e: (max(s, 0.0) if s >= mean else 0.0) for e, (_, s) in match.items()}
            for j in kept:
                group = [e for e in match if match[e][0] == j]
                for states, out in ((keys, out_k), (values, out_v)):
                    if mode == "averaged":
                        merged = (states[b, h, j] + sum(states[b, h, e] for e in group)) / (1 + len(group))
                    elif mode == "pivotal":
                        pivots = [(states[b, h, e] + states[b, h, j]) / 2 for e in group]
                        merged = (states[b, h, j] + sum(pivots)) / (1 + len(group))
                    else:
                        total = states[b, h, j] + sum(weights[e] * states[b, h, e] for e in group)
                        merged = total / (1 + sum(weights[e] for e in group))
                    out[b, h, j] = merged
    return out_k, out_v


def random_case(seed, batch=2, heads=2, length=23, dim=6, pad=(0, 5)):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, length, dim, generator=gen)
    values = torch.randn(batch, heads, length, dim, generator=gen)
    valid = torch.ones(batch, length, dtype=torch.bool)
    for b, p in enumerate(pad[:batch]):
        valid[b, :p] = False
    keep = (torch.rand(batch, heads, length, generator=gen) < 0.35) & valid[:, None, :]
    keep[:, :, -1] = True
    labels = torch.randint(0, 2, (batch, length), generator=gen)
    return keys, values, keep, valid, labels


@pytest.mark.parametrize("mode", ["averaged", "pivotal", "weighted"])
@pytest.mark.parametrize("scope", ["any", "same_modality"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_matches_loop_reference(mode, scope, seed):
    keys, values, keep, valid, labels = random_case(seed)
    labels = labels if scope == "same_modality" else None
    got_k, got_v = merge_evicted(keys, values, keep, valid, mode, labels)
    ref_k, ref_v = loop_merge(keys, values, keep, valid, mode, labels)
    kept = keep.expand_as(keys[..., 0])
    torch.testing.assert_close(got_k[kept].double(), ref_k[kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v[kept].double(), ref_v[kept], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["averaged", "pivotal", "weighted"])
def test_merge_with_nothing_evicted_is_identity(mode):
    keys, values, _, valid, labels = random_case(3)
    keep = valid[:, None, :].expand(-1, 2, -1)
    got_k, got_v = merge_evicted(keys, values, keep, valid, mode, labels)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), mode=st.sampled_from(["averaged", "pivotal", "weighted"]))
def test_merged_states_are_convex_combinations(seed, mode):
    """Each merged kept state lies in the box spanned by itself and the evicted states matched to it."""
    keys, values, keep, valid, _ = random_case(seed)
    got_k, _ = merge_evicted(keys, values, keep, valid, mode)
    from kvpress_mm.merge import nearest_kept

    evict = valid[:, None, :] & ~keep
    kept_index, kept_valid, evicted_index, match, _ = nearest_kept(keys, keep, evict)
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            for slot in range(kept_index.shape[-1]):
                if not kept_valid[b, h, slot]:
                    continue
                j = int(kept_index[b, h, slot])
                members = [j] + [int(evicted_index[b, h, e]) for e in range(match.shape[-1]) if match[b, h, e] == slot]
                group = keys[b, h, members]
                assert bool((got_k[b, h, j] >= group.min(0).values - 1e-5).all())
                assert bool((got_k[b, h, j] <= group.max(0).values + 1e-5).all())


TEXT, IMAGE = int(Modality.TEXT), int(Modality.IMAGE)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layer_cases(), mode=st.sampled_from(["strict_budget", "keep_all_text"]))
def test_text_prior_invariant(case, mode):
    """strict: no unprotected image token is kept while an unprotected text token is evicted.
    keep_all_text: every text token is kept (the release's behaviour)."""
    budget, budget_tokens = case[8], case[9]
    strategy = kvpress_mm.get_strategy(
        "look_m", budget=budget, budget_tokens=budget_tokens, text_prior_mode=mode, merge="none"
    )
    layer = make_layer(case, strategy)
    keep = strategy.plan(layer).keep.expand(layer.batch, layer.kv_heads, layer.length)
    protected = strategy.promised(layer)[:, None, :]
    text = layer.is_modality(Modality.TEXT)[:, None, :]
    vision = (layer.valid & ~layer.is_modality(Modality.TEXT))[:, None, :]
    if mode == "strict_budget":
        assert torch.equal(keep.sum(-1), layer.keep_count[:, None].expand(-1, layer.kv_heads))
        text_evicted = (text & ~keep & ~protected).any(-1)
        vision_kept = (vision & keep & ~protected).any(-1)
        assert not bool((text_evicted & vision_kept).any())
    else:
        assert bool((keep | ~text).all())
        assert bool((keep.sum(-1) >= layer.keep_count[:, None]).all())


def test_headline_preset():
    s = kvpress_mm.get_strategy("text_prior_pivot_merge", budget=0.2)
    assert (s.budget, s.text_prior, s.text_prior_mode, s.merge, s.sinks, s.recent_share) == (
        0.2,
        True,
        "strict_budget",
        "pivotal",
        4,
        0.5,
    )
    assert kvpress_mm.get_strategy("look_m") == kvpress_mm.get_strategy("text_prior_pivot_merge")
    for name, merge, prior in [
        ("avg_merge", "averaged", False),
        ("pivot_merge", "pivotal", False),
        ("weighted_merge", "weighted", False),
        ("text_prior_h2o", "none", True),
        ("text_prior_avg_merge", "averaged", True),
        ("text_prior_weighted_merge", "weighted", True),
        ("mean_h2o", "none", False),
    ]:
        s = kvpress_mm.get_strategy(name, budget=0.1)
        assert (s.merge, s.text_prior) == (merge, prior), name


@pytest.mark.parametrize(
    "field,value", [("merge", "sideways"), ("merge_scope", "all"), ("text_prior_mode", "x"), ("sinks", -1)]
)
def test_bad_look_m_fields(field, value):
    with pytest.raises(ValueError, match=field):
        kvpress_mm.get_strategy("look_m", **{field: value})


def test_text_prior_keeps_text_in_a_real_model():
    """Inside generate on LLaVA: at a budget below the text count, strict text-prior keeps no image token
    outside the protected windows."""
    from helpers import generate, tiny

    t = tiny("llava")
    inputs = t.make_inputs([[("text", 30), ("image",), ("image",), ("text", 30)]])
    with kvpress_mm.get_strategy("text_prior_h2o", budget=0.3)(t.model) as press:
        generate(t.model, inputs, steps=2)
    image = inputs["input_ids"][0] == t.image_token_id
    n = inputs["input_ids"].shape[1]
    keep_count = math.floor(0.3 * n + 1e-6)
    recent = range(n - keep_count // 2, n)
    for keep in press.kept.values():
        for h in range(keep.shape[1]):
            kept_images = [j for j in torch.nonzero(keep[0, h] & image).flatten().tolist() if j not in recent]
            assert kept_images == []


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    width=st.integers(1, 300),
    levels=st.integers(1, 6),
    blocked=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_first_argmax_is_max_with_the_first_index(rows, width, levels, blocked, seed):
    """Few distinct values make ties common; -inf marks blocked columns, some rows entirely."""

    from kvpress_mm.merge import first_argmax

    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (2, rows, width), generator=gen).float()
    scores[torch.rand(scores.shape, generator=gen) < blocked] = float("-inf")
    best, index = first_argmax(scores)
    expected = scores.numpy().argmax(-1)  # numpy documents the first occurrence
    assert torch.equal(index, torch.from_numpy(expected))
    assert torch.equal(best, scores.amax(-1))


@pytest.mark.parametrize("chunk_elements", [None, "gpu", 3000])
def test_nearest_kept_over_many_kept_keys_matches_float64_search(chunk_elements, monkeypatch):
    """Hundreds of kept keys (the blocked argmax path), against cosine + argmax in float64; evicted tokens
    matched in the CPU's chunks, in one GPU-sized chunk, or in many small ones."""
    from kvpress_mm import merge
    from kvpress_mm.merge import nearest_kept

    if chunk_elements is not None:
        monkeypatch.setattr(
            merge, "_CHUNK_ELEMENTS", merge._CHUNK_ELEMENTS_GPU if chunk_elements == "gpu" else chunk_elements
        )

    gen = torch.Generator().manual_seed(7)
    keys = torch.randn(2, 3, 700, 16, generator=gen)
    keep = torch.rand(2, 3, 700, generator=gen) < 0.4
    evict = ~keep
    kept_index, kept_valid, evicted_index, match, similarity = nearest_kept(keys, keep, evict)
    assert kept_valid.shape[-1] > 2 * 64
    unit = torch.nn.functional.normalize(keys.double(), dim=-1)
    for b in range(2):
        for h in range(3):
            kept = keep[b, h].nonzero()[:, 0]
            evicted = evict[b, h].nonzero()[:, 0]
            sim = unit[b, h, evicted] @ unit[b, h, kept].T
            n_kept, n_evicted = len(kept), len(evicted)
            slots = kept_index[b, h, -n_kept:]
            assert torch.equal(slots, kept)
            got = kept_index[b, h, match[b, h, -n_evicted:]]
            assert torch.equal(got, kept[sim.argmax(-1)])
            assert torch.allclose(similarity[b, h, -n_evicted:].double(), sim.amax(-1), atol=1e-5)


# ---------------------------------------------------------------- ranked by the observation window


@pytest.mark.parametrize("score", ["sum", "mean"])
def test_window_ranking_scores_match_loop_reference(score):
    from test_sparsemm import _layer, loop_window_votes

    window = 5
    s = kvpress_mm.get_strategy("look_m", budget=0.4, ranking="window", window_size=window, score=score)
    assert s.needs().window == window and not s.needs().accumulated
    layer = _layer(2, 2, 2, 26, torch.tensor([10, 8]), pads=(0, 6), window=window)
    got = s.scores(layer)
    for b in range(2):
        real = [j for j in range(26) if layer.valid[b, j]]
        for h in range(2):
            votes = loop_window_votes(layer, b, h, window, 1)
            for rank, j in enumerate(real):
                seen_by = min(len(real) - rank, window) if score == "mean" else 1
                assert math.isclose(float(got[b, h, j]), votes[j] / seen_by, rel_tol=1e-5, abs_tol=1e-7)


def test_accumulated_ranking_stays_the_default():
    s = kvpress_mm.get_strategy("look_m")
    assert (s.ranking, s.needs()) == ("accumulated", kvpress_mm.AttentionNeeds(accumulated=True))
    with pytest.warns(UserWarning, match="window_size=8 is ignored"):
        kvpress_mm.get_strategy("look_m", window_size=8)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_window_ranking_in_generate(family):
    """Selection only (merge="none"): equal to the masked full cache; with merging: runs, finite."""
    from helpers import generate, masked_reference_generate, rows_for, tiny

    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    s = kvpress_mm.get_strategy("look_m", budget=0.3, ranking="window", window_size=6, merge="none")
    with s(t.model) as press:
        tokens, logits = generate(t.model, inputs, steps=4)
    kept = dict(press.kept)
    _, ref_logits = masked_reference_generate(t.model, inputs, kept, steps=4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    with kvpress_mm.get_strategy("look_m", budget=0.3, ranking="window", window_size=6)(t.model) as press:
        _, merged = generate(t.model, inputs, steps=4)
    assert press.compressed_any and torch.isfinite(merged).all()
