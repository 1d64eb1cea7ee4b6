"""Framework for the multimodal successors (issue 20): query sets, sparsity, cross-modal tables, spans, budget splits.

Every statistic is checked against plain softmax probabilities in float64 and Python loops over the entries, with
a left-padded batch, grouped-query heads, masked and unmasked prompts, a later prompt whose keys include a
compressed past (some past slots hidden), and the eager path (probabilities handed over by the model).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_mm.layer import CROSS_GROUPS, AttentionNeeds, LayerKV
from kvpress_mm.modality import Modality
from kvpress_mm.selection import proportional_counts, span_ids, span_pool, spans_from_boundaries, top_per_head
from kvpress_mm.statistics import Statistics

TXT, IMG, VID, PAD = int(Modality.TEXT), int(Modality.IMAGE), int(Modality.VIDEO), int(Modality.PAD)


def _case(past: int, seed: int = 0, masked: bool = True):
    """Random q / k / v of a padded 2-row batch (4 query heads, 2 kv heads), labels, allowed [B, 1, L, S]."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor(
        [
            [PAD, PAD, PAD, TXT, TXT, IMG, IMG, IMG, IMG, TXT, TXT, VID, VID, TXT, TXT, TXT, TXT, TXT],
            [TXT, IMG, IMG, IMG, TXT, TXT, TXT, TXT, IMG, IMG, TXT, TXT, TXT, TXT, TXT, TXT, TXT, TXT],
        ],
        dtype=torch.int8,
    )
    b, length = labels.shape
    s_len = past + length
    q = torch.randn(b, 4, length, 8, generator=gen) * 2
    k = torch.randn(b, 2, s_len, 8, generator=gen) * 2
    v = torch.randn(b, 2, s_len, 8, generator=gen)
    valid = labels != PAD
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = torch.ones(b, 1, length, s_len, dtype=torch.bool)
    allowed[:, :, :, past:] = (causal & valid[:, None, :])[:, None]
    past_labels = torch.randint(0, 3, (b, past), generator=gen).to(torch.int8)
    if past:
        hidden = torch.rand(b, past, generator=gen) < 0.3  # compressed-away or padded past slots
        allowed[:, :, :, :past] &= ~hidden[:, None, None, :]
        past_labels[hidden] = PAD
    key_labels = torch.cat([past_labels, labels], dim=1)
    if not masked:
        assert past == 0
        labels[:] = torch.where(labels == PAD, TXT, labels)
        key_labels = labels.clone()
        allowed = causal[None, None].expand(b, 1, length, length).clone()
    return q, k, v, labels, key_labels, allowed


def _probs(q, k, allowed) -> torch.Tensor:
    """float64 softmax probabilities [B, H, L, S], zero rows where a query sees nothing."""
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0)


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=attention_mask
    )
    return out.transpose(1, 2), None


def _eager(module, query, key, value, attention_mask, **kwargs):
    if attention_mask is None:
        length, s_len = query.shape[2], key.shape[2]
        attention_mask = torch.ones(length, s_len, dtype=torch.bool).tril(s_len - length)[None, None]
    out, _ = _sdpa(module, query, key, value, attention_mask)
    return out, _probs(query, key, attention_mask).float()


def _run(needs, q, k, v, labels, key_labels, allowed, eager, mask=True):
    valid = labels != PAD
    stats = Statistics(needs, eager=eager)
    view = (labels, valid, valid.sum(-1), bool(valid.all()))
    first = k.shape[2] == q.shape[2]
    _, out = stats.prompt_attention(
        _eager if eager else _sdpa,
        None,
        q,
        k,
        v,
        allowed if mask else None,
        view,
        {},
        None if first else key_labels,
    )
    return out


def _members(labels, queries):
    """Python: the set's positions per row."""
    out = []
    for row in labels.tolist():
        real = [j for j, m in enumerate(row) if m != PAD]
        text = [j for j in real if row[j] == TXT]
        if queries == "text":
            out.append(text)
        elif queries == "post_vision":
            vision = [j for j in real if row[j] in (IMG, VID)]
            out.append([j for j in text if not vision or j > max(vision)])
        else:
            out.append(real)
    return out


def _elite(q, k, labels, key_labels, allowed, count, threshold):
    """Python: AirCache's elite positions per row (head-averaged relevancy of the last text query)."""
    b, h, length, _ = q.shape
    offset = k.shape[2] - length
    result = []
    for r in range(b):
        row = labels[r].tolist()
        texts = [j for j, m in enumerate(row) if m == TXT]
        ref = texts[-1] if texts else length - 1
        keys = [j for j in range(k.shape[2]) if key_labels[r, j] == TXT and allowed[r, 0, ref, j]]
        rel = {j: 0.0 for j in keys}
        for head in range(h):
            kk = k[r, head // (h // k.shape[1])].double()
            s = {j: float(q[r, head, ref].double() @ kk[j]) * q.shape[-1] ** -0.5 for j in keys}
            z = max(s.values())
            total = sum(math.exp(x - z) for x in s.values())
            for j in keys:
                rel[j] += math.exp(s[j] - z) / total / h
        top = max(rel.values())
        elite = [j for j in texts if rel.get(offset + j, 0.0) >= threshold * top and rel.get(offset + j, 0.0) > 0]
        if not elite:
            elite = [ref]
        elite = sorted(sorted(elite, key=lambda j: -rel[offset + j])[:count])
        result.append([-1] * (min(count, length) - len(elite)) + elite)
    return torch.tensor(result)


CASES = [(0, True), (0, False), (7, True)]  # (past slots, masked)


@pytest.mark.parametrize("past,masked", CASES)
@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("queries", ["last", "post_vision", "text"])
def test_query_set_window_and_sums_equal_python(past, masked, eager, queries):
    q, k, v, labels, key_labels, allowed = _case(past, masked=masked)
    out = _run(AttentionNeeds(window=5, accumulated=True, queries=queries), q, k, v, labels, key_labels, allowed, eager)
    probs = _probs(q, k, allowed)
    members = _members(labels, queries)
    length = labels.shape[1]
    for r, rows in enumerate(members):
        expected = rows[-5:]
        if queries == "last":
            expected = [j for j in range(length - 5, length) if labels[r, j] != PAD]
        positions = out.window_positions[r].tolist()
        assert positions == [-1] * (5 - len(expected)) + expected
        for slot, j in enumerate(positions):
            want = probs[r, :, j] if j >= 0 else torch.zeros_like(probs[r, :, 0])
            torch.testing.assert_close(out.window[r, :, slot].double(), want, atol=1e-5, rtol=0)
        summed = sum((probs[r, :, j] for j in rows), torch.zeros_like(probs[r, :, 0]))
        torch.testing.assert_close(out.accumulated[r].double(), summed, atol=1e-5, rtol=0)


def _group(label, name):
    return label != PAD and (name == "any" or (name == "text") == (label == TXT))


def _python_tables(probs, allowed, labels, key_labels, members, threshold):
    """Per (row, head): (sparsity, mass [3, 3], entropy [3, 3], counted [3, 3]) over the member queries."""
    out = {}
    for r, rows in enumerate(members):
        for head in range(probs.shape[1]):
            below = seen = 0
            mass = torch.zeros(3, 3, dtype=torch.float64)
            entropy = torch.zeros(3, 3, dtype=torch.float64)
            counted = torch.zeros(3, 3, dtype=torch.float64)
            for j in rows:
                p = probs[r, head, j]
                visible = allowed[r, 0, j]
                top = float(p.max())
                below += int(((p < threshold * top) & visible).sum())
                seen += int(visible.sum())
                for qi, qname in enumerate(CROSS_GROUPS):
                    if not _group(int(labels[r, j]), qname):
                        continue
                    for ki, kname in enumerate(CROSS_GROUPS):
                        keys = [s for s in range(p.shape[0]) if _group(int(key_labels[r, s]), kname)]
                        m = float(sum(p[s] for s in keys))
                        mass[qi, ki] += m
                        if m > 0:
                            entropy[qi, ki] -= sum(
                                float(p[s]) / m * math.log(float(p[s]) / m) for s in keys if p[s] > 0
                            )
                            counted[qi, ki] += 1
            out[r, head] = (below / seen if seen else 0.0, mass, entropy, counted)
    return out


def _check_tables(out, expected, sparsity=True, tables=True):
    for (r, head), (share, mass, entropy, counted) in expected.items():
        if sparsity:
            assert out.sparsity[r, head].item() == pytest.approx(share, abs=1e-6)
        if tables:
            torch.testing.assert_close(out.cross_modal.mass[r, head].double(), mass, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.cross_modal.entropy[r, head].double(), entropy, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(out.cross_modal.queries[r].double(), counted, atol=0, rtol=0)


@pytest.mark.parametrize("past,masked", CASES)
@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("queries", ["last", "post_vision"])
def test_sparsity_and_cross_modal_equal_python(past, masked, eager, queries):
    q, k, v, labels, key_labels, allowed = _case(past, seed=3, masked=masked)
    needs = AttentionNeeds(accumulated=True, queries=queries, sparsity=0.2, cross_modal="all")
    out = _run(needs, q, k, v, labels, key_labels, allowed, eager)
    probs = _probs(q, k, allowed)
    _check_tables(out, _python_tables(probs, allowed, labels, key_labels, _members(labels, queries), 0.2))


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("queries", ["last", "text", "post_vision"])
def test_sparsity_in_the_one_pass_form_equals_python(masked, queries, monkeypatch):
    """Sparsity with the sums only: the fused CPU pass serves it (a set starting in the prompt's first half)."""
    from kvpress_mm import statistics

    used = []
    original = statistics.attention_with_statistics
    monkeypatch.setattr(statistics, "attention_with_statistics", lambda *a, **kw: used.append(1) or original(*a, **kw))
    q, k, v, labels, key_labels, allowed = _case(0, seed=4, masked=masked)
    needs = AttentionNeeds(accumulated=True, queries=queries, sparsity=0.3)
    out = _run(needs, q, k, v, labels, key_labels, allowed, False, mask=masked)
    probs = _probs(q, k, allowed)
    members = _members(labels, queries)
    _check_tables(out, _python_tables(probs, allowed, labels, key_labels, members, 0.3), tables=False)
    for r, rows in enumerate(members):
        summed = sum((probs[r, :, j] for j in rows), torch.zeros_like(probs[r, :, 0]))
        torch.testing.assert_close(out.accumulated[r].double(), summed, atol=1e-5, rtol=0)
    late = queries == "post_vision" and min(rows[0] for rows in members) >= labels.shape[1] // 2
    assert bool(used) == (not late)


@pytest.mark.parametrize("eager", [False, True])
def test_between_tables_are_skipped_when_the_keys_hold_one_modality(eager):
    q, k, v, labels, key_labels, allowed = _case(0, seed=6, masked=False)
    text_only = torch.full_like(labels, TXT)
    needs = AttentionNeeds(accumulated=True, cross_modal="between")
    out = _run(needs, q, k, v, text_only, text_only, allowed, eager, mask=False)
    assert not out.cross_modal.mass.any() and not out.cross_modal.entropy.any()
    probs = _probs(q, k, allowed)
    torch.testing.assert_close(out.accumulated.double(), probs.sum(2), atol=1e-5, rtol=0)
    # with both modalities present the tables are computed in full
    out = _run(needs, q, k, v, labels, key_labels, allowed, eager, mask=False)
    _check_tables(out, _python_tables(probs, allowed, labels, key_labels, _members(labels, "last"), 0), False)


@pytest.mark.parametrize("past,masked", CASES)
@pytest.mark.parametrize("eager", [False, True])
def test_elite_reductions_equal_python(past, masked, eager):
    q, k, v, labels, key_labels, allowed = _case(past, seed=7, masked=masked)
    needs = AttentionNeeds(
        window=5, accumulated=True, queries="elite", elite_threshold=0.3, sparsity=0.1, cross_modal="all"
    )
    out = _run(needs, q, k, v, labels, key_labels, allowed, eager)
    members = [[j for j in row if j >= 0] for row in out.window_positions.tolist()]
    probs = _probs(q, k, allowed)
    _check_tables(out, _python_tables(probs, allowed, labels, key_labels, members, 0.1))


@pytest.mark.parametrize("past,masked", CASES)
@pytest.mark.parametrize("eager", [False, True])
def test_elite_window_equals_python(past, masked, eager):
    q, k, v, labels, key_labels, allowed = _case(past, seed=5, masked=masked)
    for threshold in (0.0, 0.5, 0.9):
        needs = AttentionNeeds(window=4, accumulated=True, queries="elite", elite_threshold=threshold)
        out = _run(needs, q, k, v, labels, key_labels, allowed, eager)
        expected = _elite(q, k, labels, key_labels, allowed, 4, threshold)
        assert torch.equal(out.window_positions, expected), threshold
        probs = _probs(q, k, allowed)
        for r in range(2):
            rows = [j for j in expected[r].tolist() if j >= 0]
            for slot, j in enumerate(expected[r].tolist()):
                if j >= 0:
                    torch.testing.assert_close(out.window[r, :, slot].double(), probs[r, :, j], atol=1e-5, rtol=0)
            summed = sum((probs[r, :, j] for j in rows), torch.zeros_like(probs[r, :, 0]))
            torch.testing.assert_close(out.accumulated[r].double(), summed, atol=1e-5, rtol=0)


def test_sets_skip_the_rows_before_their_first_query(monkeypatch):
    """A post-vision set's pass runs only over the rows from its first query on (not the whole prompt)."""
    from kvpress_mm import statistics

    seen = []
    original = statistics.accumulated_attention

    def spy(query, key, *args, **kwargs):
        seen.append((query.shape[2], key.shape[2]))
        return original(query, key, *args, **kwargs)

    monkeypatch.setattr(statistics, "accumulated_attention", spy)
    q, k, v, labels, key_labels, allowed = _case(0)
    _run(AttentionNeeds(accumulated=True, queries="post_vision"), q, k, v, labels, key_labels, allowed, False)
    first = min(r[0] for r in _members(labels, "post_vision"))
    assert seen == [(labels.shape[1] - first, labels.shape[1])]


def test_mass_by_modality_equals_python():
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([[PAD, TXT, IMG, IMG, VID, TXT], [TXT, TXT, IMG, VID, VID, TXT]], dtype=torch.int8)
    sums = torch.rand(2, 3, 6, generator=gen)
    window = torch.rand(2, 3, 4, 6, generator=gen)
    layer = LayerKV(0, 1, torch.zeros(2, 3, 6, 4), torch.zeros(2, 3, 6, 4), labels, torch.tensor([3, 3]), 3)
    got, got_window = layer.mass_by_modality(sums), layer.mass_by_modality(window)
    for r in range(2):
        for head in range(3):
            for mi, m in enumerate((TXT, IMG, VID)):
                keys = [s for s in range(6) if labels[r, s] == m]
                assert got[r, head, mi].item() == pytest.approx(float(sum(sums[r, head, s] for s in keys)))
                for qi in range(4):
                    assert got_window[r, head, qi, mi].item() == pytest.approx(
                        float(sum(window[r, head, qi, s] for s in keys))
                    )


# ---------------------------------------------------------------------------------------- spans and splits


def test_span_ids_cut_runs_into_chunks_and_image_rows():
    labels = torch.tensor([[PAD, PAD] + [TXT] * 5 + [IMG] * 9 + [TXT] * 3 + [IMG] * 5], dtype=torch.int8)
    spans = span_ids(labels, 2)[0].tolist()
    # text 5 -> 2+2+1; image 3x3 -> 3 rows; text 3 -> 2+1; image of 5 (not square) -> 2+2+1
    expected = [-1, -1, 0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 7, 8, 8, 9, 9, 10]
    assert spans == expected
    assert span_ids(labels, 2, image_rows=False)[0].tolist()[7:16] == [3, 3, 4, 4, 5, 5, 6, 6, 7]


def test_span_pool_gives_every_token_its_span_max_and_top_k_keeps_spans_whole():
    labels = torch.tensor([[TXT] * 8], dtype=torch.int8)
    spans = span_ids(labels, 4)
    scores = torch.tensor([[[0.1, 0.9, 0.2, 0.3, 0.5, 0.4, 0.6, 0.45]]])
    pooled = span_pool(scores, spans)
    assert pooled[0, 0].tolist() == pytest.approx([0.9] * 4 + [0.6] * 4)
    keep = top_per_head(pooled + 1e-3 * scores, torch.tensor([[4]]))
    assert keep[0, 0].tolist() == [True] * 4 + [False] * 4  # the "7890" span kept whole


def test_spans_from_boundaries():
    ids = torch.tensor([[0, 5, 6, 13, 7, 13, 8, 9]])
    labels = torch.tensor([[PAD, TXT, TXT, TXT, TXT, TXT, IMG, IMG]], dtype=torch.int8)
    assert spans_from_boundaries(ids, labels, [13])[0].tolist() == [-1, 0, 0, 0, 1, 1, 2, 2]


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.floats(0, 10), min_size=1, max_size=7),
    caps=st.lists(st.integers(0, 12), min_size=7, max_size=7),
    low=st.integers(0, 1),
    total=st.integers(0, 90),
)
def test_proportional_counts_hold_the_total_within_bounds(weights, caps, low, total):
    n = len(weights)
    high = torch.tensor(caps[:n])
    lows = torch.clamp(high, max=low)
    counts = proportional_counts(torch.tensor([weights]), torch.tensor([total]), high[None], lows[None])[0]
    clipped = min(max(total, int(lows.sum())), int(high.sum()))
    assert int(counts.sum()) == clipped
    assert bool((counts >= lows).all()) and bool((counts <= high).all())
    # proportional where nothing binds: every bin within 1 of its exact share
    w = torch.tensor(weights, dtype=torch.float64)
    if low == 0 and w.sum() > 0 and bool((w > 0).all()):
        exact = w / w.sum() * clipped
        if bool((exact <= high).all()):
            assert bool(((counts - exact).abs() < 1 + 1e-6).all())


@pytest.mark.parametrize("past,masked", CASES)
@pytest.mark.parametrize("eager", [False, True])
def test_recent_set_sums_the_last_window_positions(past, masked, eager):
    q, k, v, labels, key_labels, allowed = _case(past, seed=8, masked=masked)
    out = _run(
        AttentionNeeds(window=5, accumulated=True, queries="recent"), q, k, v, labels, key_labels, allowed, eager
    )
    assert out.window is None
    probs = _probs(q, k, allowed)
    length = labels.shape[1]
    for r in range(2):
        rows = [j for j in range(length - 5, length) if labels[r, j] != PAD]
        summed = sum((probs[r, :, j] for j in rows), torch.zeros_like(probs[r, :, 0]))
        torch.testing.assert_close(out.accumulated[r].double(), summed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llama"])
def test_snapkv_spans_keep_whole_chunks_inside_generate(family):
    """SnapKV with spans="chunks": ties inside a span are broken by the budget's edge only, so at most one span
    per (row, head) is cut; decoding equals the full cache with the evicted positions masked."""
    from helpers import generate, masked_reference_generate, rows_for, tiny

    import kvpress_mm
    from kvpress_mm.modality import modality_from_ids

    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    strategy = kvpress_mm.get_strategy("snapkv", budget=0.4, window_size=4, spans="chunks", span_size=3)
    with strategy(t.model) as session:
        tokens, logits = generate(t.model, inputs, steps=4)
    ref_tokens, ref_logits = masked_reference_generate(t.model, inputs, dict(session.kept), steps=4)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    image_ids = [i for i in (t.image_token_id, t.video_token_id) if i is not None]
    labels = modality_from_ids(inputs["input_ids"], inputs["attention_mask"], image_ids or None)
    spans = span_ids(labels, 3)
    length = labels.shape[1]
    window = torch.arange(length) >= length - 4
    cut_any = 0
    for keep in session.kept.values():
        for b in range(keep.shape[0]):
            for h in range(keep.shape[1]):
                k = keep[b, h] & ~window
                cut = 0
                for span in spans[b].unique().tolist():
                    if span < 0:
                        continue
                    members = (spans[b] == span) & ~window
                    if members.any() and 0 < int(k[members].sum()) < int(members.sum()):
                        cut += 1
                assert cut <= 1
                cut_any += cut
    # token-level selection (the paper's) cuts spans everywhere on the same prompt
    with kvpress_mm.get_strategy("snapkv", budget=0.4, window_size=4)(t.model) as plain:
        generate(t.model, inputs, steps=1)
    plain_cuts = sum(
        int(0 < int((keep[b, h] & ((spans[b] == s) & ~window)).sum()) < int(((spans[b] == s) & ~window).sum()))
        for keep in plain.kept.values()
        for b in range(keep.shape[0])
        for h in range(keep.shape[1])
        for s in spans[b].unique().tolist()
        if s >= 0
    )
    assert plain_cuts > cut_any
