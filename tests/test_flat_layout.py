"""The flat cache layout (layout="flat"): compacted layers store only the slots each (row, kv head) keeps.

Decoding on it equals decoding on the padded layout (tokens equal, logits within 1e-5 in fp32) for head-wise
budgets (adakv, sparsemm, kvzip head_budgets=layer) on padded batches of two, later turns (appended, left-padded,
or compressed again), both backends; its bytes are exactly the kept tokens' plus the tail's; copies are
independent; the model's own attention cannot read it outside the strategy context. The attention function itself
is checked against masked sdpa / eager softmax on the padded tensors over random per-head counts and shapes.
"""

from __future__ import annotations

import contextlib
import copy
import types

import pytest
import torch
import torch.nn.functional as F
from conversation import follow_up, turn_ids
from conversation import generate as converse
from helpers import profile_fields, rows_for, tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kvzip import _kvzip

import kvpress_mm
from kvpress_mm import flat_attention as flat_attention_module
from kvpress_mm.adapters import adapter_for
from kvpress_mm.backend import set_decoder_attention
from kvpress_mm.compressed_cache import LAYOUT_ENV, CompressedCache, CompressedLayer, FlatLayer
from kvpress_mm.flat_attention import flat_attention
from kvpress_mm.head_profiles import ModelIdentity
from kvpress_mm.layer_state import LayerState
from kvpress_mm.modality import Modality
from kvpress_mm.testing import TINY_FAMILIES

STEPS = 5
FEW = ["llama", "llava", "qwen2_vl", "gemma3"]  # text, image, M-RoPE, sliding layers


# small windows: the tiny prompts' budgets are then not all window, and heads keep different counts
SMALL_WINDOW = {"adakv": {"inner_fields": {"window_size": 4}}, "sparsemm": {"window_size": 4}}


def _strategy(t, name, budget=0.3, **fields):
    if name == "kvzip":
        return _kvzip(budget=budget, head_budgets="layer", **fields)
    fields = {**SMALL_WINDOW.get(name, {}), **fields, **profile_fields(name, ModelIdentity.of(t.model))}
    return kvpress_mm.get_strategy(name, budget=budget, **fields)


def _heads_differ(layers) -> bool:
    return any(len(set(row)) > 1 for layer in layers.values() for row in layer.counts)


def _run(t, strategy, inputs, layout, steps=STEPS, cache=None):
    """(sequences, logits [B, steps, V], cache, session) of one generate inside the strategy context."""
    with strategy(t.model, layout=layout) as session:
        seq, logits, cache = converse(t.model, inputs, steps, cache=cache)
    return seq, logits, cache, session


def _flat_layers(cache) -> dict[int, FlatLayer]:
    return {i: layer for i, layer in enumerate(cache.layers) if isinstance(layer, FlatLayer)}


def _assert_same(a, b, atol=1e-5):
    assert torch.equal(a[0], b[0]), "generated tokens differ"
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=0)


@contextlib.contextmanager
def _backend(model, name):
    decoder = adapter_for(model).decoder(model)
    original = decoder.config._attn_implementation
    set_decoder_attention(model, decoder, name)
    try:
        yield
    finally:
        set_decoder_attention(model, decoder, original)


# ---------------------------------------------------------------- decoding equals the padded layout


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", ["adakv", "sparsemm"])
def test_decode_equals_the_padded_layout(family, name):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))  # two left-padded rows
    strategy = _strategy(t, name)
    padded = _run(t, strategy, inputs, "padded")
    flat = _run(t, strategy, inputs, "flat")
    _assert_same(flat, padded)
    layers = _flat_layers(flat[2])
    assert layers, "no layer was stored flat"
    assert _heads_differ(layers), "the heads kept the same counts: nothing head-wise was tested"
    for i, layer in layers.items():
        assert layer.get_seq_length() == padded[2].layers[i].get_seq_length()
        assert layer.physical_length == padded[2].layers[i].physical_length
        assert torch.equal(layer.kept_positions(), padded[2].layers[i].kept_positions())
    assert flat[3].report.after_bytes < padded[3].report.after_bytes


@pytest.mark.parametrize("family", FEW)
def test_kvzip_layer_budgets_decode_equals_the_padded_layout(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    strategy = _strategy(t, "kvzip")
    padded = _run(t, strategy, inputs, "padded")
    flat = _run(t, strategy, inputs, "flat")
    _assert_same(flat, padded)
    assert _heads_differ(_flat_layers(flat[2]))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", ["snapkv", "mixkv"])
def test_other_strategies_on_padded_batches_equal_the_padded_layout(family, name):
    """Rows of a padded batch keep different counts: their padding is not stored either (any strategy)."""
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    fields = {"base": "adakv", "base_fields": SMALL_WINDOW["adakv"]} if name == "mixkv" else {}
    strategy = _strategy(t, name, **fields)
    flat = _run(t, strategy, inputs, "flat")
    _assert_same(flat, _run(t, strategy, inputs, "padded"))
    assert _flat_layers(flat[2])


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_eager_backend_equals_the_padded_layout_with_its_probabilities(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    strategy = _strategy(t, "adakv")
    out = {}
    with _backend(t.model, "eager"):
        for layout in ("padded", "flat"):
            with strategy(t.model, layout=layout):
                out[layout] = t.model.generate(
                    **inputs,
                    max_new_tokens=3,
                    do_sample=False,
                    output_logits=True,
                    output_attentions=True,
                    return_dict_in_generate=True,
                )
    padded, flat = out["padded"], out["flat"]
    assert _flat_layers(flat.past_key_values)
    assert torch.equal(flat.sequences, padded.sequences)
    torch.testing.assert_close(torch.stack(flat.logits), torch.stack(padded.logits), atol=1e-5, rtol=0)
    for step in range(1, 3):  # decode steps: the attentions of the compacted layers, in the padded coordinates
        got, ref = _text_attentions(flat, step), _text_attentions(padded, step)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _text_attentions(out, step):
    attentions = out.attentions[step]
    if isinstance(attentions, dict) or hasattr(attentions, "keys"):
        attentions = attentions.get("language_model", attentions.get("decoder", attentions))
    return [a for a in attentions if a is not None]


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_bfloat16_decode_follows_the_padded_layout(family):
    t = tiny(family, torch.bfloat16)
    inputs = t.make_inputs(rows_for(t))
    strategy = _strategy(t, "adakv")
    flat, padded = _run(t, strategy, inputs, "flat", steps=3), _run(t, strategy, inputs, "padded", steps=3)
    assert _flat_layers(flat[2])
    torch.testing.assert_close(flat[1][:, 0], padded[1][:, 0], atol=0.1, rtol=0.02)


# ---------------------------------------------------------------- later prompts


def _left_padded_follow_up(t, inputs, seq, length, pad, seed):
    """The next turn with the first `pad` new tokens of row 0 padding (masked out in the 2-D mask)."""
    nxt = follow_up(inputs, seq, turn_ids(t, seq.shape[0], length, seed=seed))
    nxt["attention_mask"][0, -length : -length + pad] = 0
    return nxt


@pytest.mark.parametrize("family", FEW)
def test_later_turns_equal_the_padded_layout(family):
    """Turn 2 appended to the flat layers (multi-token queries over the prefix + the causal tail), turn 3 with
    left padding inside the new tokens of one row."""
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    strategy = _strategy(t, "adakv")
    runs = {}
    for layout in ("padded", "flat"):
        first = _run(t, strategy, inputs, layout)
        second_in = follow_up(inputs, first[0], turn_ids(t, 2, 6, seed=11))
        second = _run(t, strategy, second_in, layout, cache=first[2])
        third_in = _left_padded_follow_up(t, second_in, second[0], 7, 3, seed=12)
        third = _run(t, strategy, third_in, layout, cache=second[2])
        runs[layout] = (first, second, third)
    for k in range(3):
        _assert_same(runs["flat"][k], runs["padded"][k])
    assert _flat_layers(runs["flat"][2][2])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_every_prompt_compresses_later_turns_of_flat_layers(family):
    """A later prompt compressed on a flat layer reads its padded form and is stored flat again."""
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    strategy = _strategy(t, "adakv", compress="every_prompt")
    runs, totals = {}, {}
    for layout in ("padded", "flat"):
        first = _run(t, strategy, inputs, layout)
        totals[layout] = {i: layer.state.total for i, layer in _flat_layers(first[2]).items()}
        second = _run(t, strategy, follow_up(inputs, first[0], turn_ids(t, 2, 9, seed=5)), layout, cache=first[2])
        runs[layout] = (first, second)
    for k in range(2):
        _assert_same(runs["flat"][k], runs["padded"][k])
    flat_cache, padded_cache = runs["flat"][1][2], runs["padded"][1][2]
    layers = _flat_layers(flat_cache)
    assert layers and totals["flat"]
    for i, layer in layers.items():
        assert layer.state.total == padded_cache.layers[i].state.total > totals["flat"].get(i, 0)
        assert torch.equal(layer.kept_positions(), padded_cache.layers[i].kept_positions())


# ---------------------------------------------------------------- bytes, copies, rows, refusals


def _slot_bytes(layer) -> int:
    return 2 * layer.keys.shape[-1] * layer.keys.element_size()


@pytest.mark.parametrize("family", ["llava", "gemma3"])
@pytest.mark.parametrize("name", ["adakv", "sparsemm"])
def test_flat_bytes_are_the_kept_tokens_and_the_tail(family, name):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    strategy = _strategy(t, name)
    _, _, cache, session = _run(t, strategy, inputs, "flat")
    _, _, padded_cache, padded_session = _run(t, strategy, inputs, "padded")
    layers = _flat_layers(cache)
    assert layers
    for i, layer in layers.items():
        b, heads, tail, _ = layer.keys.shape
        kept = int(session.kept[i].expand(b, heads, -1).sum())
        assert tail == STEPS - 1
        assert layer.kv_bytes() == (kept + b * heads * tail) * _slot_bytes(layer)
        # the report counted the layer at compression, before any token was appended
        assert session.report.layers[i].after_bytes == kept * _slot_bytes(layer)
        padded = padded_cache.layers[i]
        assert padded.keys.numel() * padded.keys.element_size() * 2 >= layer.kv_bytes()
    size = kvpress_mm.cache_size(cache)
    others = sum(
        layer.keys.numel() * layer.keys.element_size() * 2 for i, layer in enumerate(cache.layers) if i not in layers
    )
    assert size.bytes == sum(layer.kv_bytes() for layer in layers.values()) + others
    assert size.bytes < kvpress_mm.cache_size(padded_cache).bytes
    assert session.report.after_bytes < padded_session.report.after_bytes


def test_copies_are_independent():
    t = tiny("qwen2_vl")
    inputs = t.make_inputs(rows_for(t))
    strategy = _strategy(t, "adakv")
    seq, _, cache, _ = _run(t, strategy, inputs, "flat")
    layers = _flat_layers(cache)
    before = {
        i: (lay.flat_keys.clone(), lay.flat_values.clone(), lay.keys.clone(), lay.get_seq_length())
        for i, lay in layers.items()
    }
    fork, copied = cache.fork(), copy.deepcopy(cache)
    nxt = follow_up(inputs, seq, turn_ids(t, 2, 6, seed=4))
    _, on_fork, _, _ = _run(t, strategy, nxt, "flat", cache=fork)
    _, on_copy, _, _ = _run(t, strategy, nxt, "flat", cache=copied)
    for i, (fk, fv, tail, length) in before.items():
        layer = cache.layers[i]
        assert torch.equal(layer.flat_keys, fk) and torch.equal(layer.flat_values, fv)
        assert torch.equal(layer.keys, tail) and layer.get_seq_length() == length
        assert fork.layers[i].get_seq_length() > length
    torch.testing.assert_close(on_fork, on_copy, atol=0, rtol=0)


def test_row_operations_follow_the_padded_layout():
    """batch_repeat_interleave / batch_select_indices / reorder_cache on flat layers, then decoding continues as on
    the padded layout treated the same way."""
    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t))
    strategy = _strategy(t, "adakv")
    caches = {layout: _run(t, strategy, inputs, layout) for layout in ("padded", "flat")}
    seq = caches["flat"][0]
    nxt = follow_up(inputs, seq, turn_ids(t, 2, 4, seed=9))
    order = torch.tensor([1, 0, 1])
    results = {}
    for layout, (_, _, cache, _) in caches.items():
        cache = cache.fork()
        cache.batch_repeat_interleave(2)  # rows 0 0 1 1
        cache.batch_select_indices(torch.tensor([0, 2, 3]))  # rows 0 1 1
        cache.reorder_cache(order)  # rows 1 0 1
        rows = {k: v[[1, 0, 1]] for k, v in nxt.items()}
        results[layout] = _run(t, strategy, rows, layout, steps=3, cache=cache)
    _assert_same(results["flat"], results["padded"])
    for i, layer in _flat_layers(results["flat"][2]).items():
        assert torch.equal(layer.kept_positions(), results["padded"][2].layers[i].kept_positions())
        assert len(layer.counts) == 3 and layer.row_offsets[-1] == layer.flat_keys.shape[0]


def test_compress_once_ask_many_on_flat_layers(monkeypatch):
    """compress_context / ask (fork + batch_repeat_interleave) with the layout from the environment."""
    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t)[:1])
    questions = [turn_ids(t, 1, 5, seed=s)[0] for s in (1, 2)]
    answers = {}
    for layout in ("padded", "flat"):
        monkeypatch.setenv(LAYOUT_ENV, layout)
        strategy = _strategy(t, "adakv")
        context = kvpress_mm.compress_context(t.model, strategy, inputs)
        layers = _flat_layers(context.cache)
        assert bool(layers) == (layout == "flat") and (layout == "padded" or _heads_differ(layers))
        answers[layout] = context.ask(questions, max_new_tokens=3, output_logits=True)
    for got, ref in zip(answers["flat"], answers["padded"]):
        assert torch.equal(got.tokens, ref.tokens)
        torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=0)


def test_outside_the_context_a_flat_cache_is_refused_clearly():
    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t))
    seq, _, cache, _ = _run(t, _strategy(t, "adakv"), inputs, "flat")
    assert isinstance(cache, CompressedCache) and _flat_layers(cache) and not cache.plain
    nxt = follow_up(inputs, seq, turn_ids(t, 2, 5, seed=3))
    with pytest.raises(ValueError, match=r"inside `with strategy\(model\):`"):
        converse(t.model, nxt, 2, cache=cache)
    # a call that skips the mask sizes (e.g. a custom 4-D mask) is refused where it reaches the layer
    i, layer = next(iter(_flat_layers(cache).items()))
    new = torch.zeros_like(layer.keys[:, :, :1])
    with pytest.raises(ValueError, match="flat layers"):
        cache.update(new, new, i)


def test_layout_is_validated_and_decode_phase_is_refused(monkeypatch):
    t = tiny("llama")
    with pytest.raises(ValueError, match="layout must be one of auto, padded, flat; got 'ragged'"):
        kvpress_mm.get_strategy("adakv", budget=0.3)(t.model, layout="ragged")
    monkeypatch.setenv(LAYOUT_ENV, "ragged")
    with pytest.raises(ValueError, match="layout must be one of auto, padded, flat"):
        kvpress_mm.get_strategy("adakv", budget=0.3)(t.model)
    monkeypatch.setenv(LAYOUT_ENV, "padded")
    assert kvpress_mm.get_strategy("adakv", budget=0.3)(t.model).layout == "padded"
    monkeypatch.setenv(LAYOUT_ENV, "flat")
    assert kvpress_mm.get_strategy("snapkv", budget=0.3)(t.model).layout == "flat"
    monkeypatch.delenv(LAYOUT_ENV)
    # the default ("auto"): flat for head-wise budgets, padded otherwise and with decode-phase compression
    assert kvpress_mm.get_strategy("adakv", budget=0.3)(t.model).layout == "flat"
    assert kvpress_mm.get_strategy("kvzip", budget=0.3, head_budgets="layer")(t.model).layout == "flat"
    assert kvpress_mm.get_strategy("kvzip", budget=0.3, head_budgets="uniform")(t.model).layout == "padded"
    assert kvpress_mm.get_strategy("snapkv", budget=0.3)(t.model).layout == "padded"
    decode = kvpress_mm.get_strategy("streaming_llm", budget=0.3, phase="decode")
    assert decode(t.model, layout="auto").layout == "padded"
    with pytest.raises(ValueError, match="layout='flat' cannot compress while decoding"):
        decode(t.model, layout="flat")


def test_a_flat_cache_continued_by_a_decode_phase_strategy_is_refused():
    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t))
    seq, _, cache, _ = _run(t, _strategy(t, "adakv"), inputs, "flat")
    decode = kvpress_mm.get_strategy("streaming_llm", budget=0.3, phase="both")
    nxt = follow_up(inputs, seq, turn_ids(t, 2, 5, seed=3))
    with pytest.raises(ValueError, match="compresses while decoding"):
        with decode(t.model):
            converse(t.model, nxt, 2, cache=cache)


# ---------------------------------------------------------------- the attention function itself

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def flat_cases(draw):
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 4))
    width = draw(st.integers(1, 24))
    tail = draw(st.integers(1, 8))
    q_len = draw(st.integers(1, tail))
    dim = draw(st.sampled_from([4, 8, 16]))
    rows_uniform = draw(st.booleans())
    left_padded = draw(st.booleans())  # the compacted layouts' slots (valid last), or any pattern
    pad_tail = draw(st.booleans())
    softcap = draw(st.sampled_from([None, 5.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    return batch, kv_heads, groups, width, tail, q_len, dim, rows_uniform, left_padded, pad_tail, softcap, dtype, seed


def _flat_case(case):
    batch, kv_heads, groups, width, tail, q_len, dim, rows_uniform, left_padded, pad_tail, _, dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    heads = 1 if rows_uniform else kv_heads
    if left_padded:
        counts = torch.randint(0, width + 1, (batch, heads), generator=gen)
        slots = torch.arange(width)[None, None, :] >= (width - counts)[..., None]
    else:
        slots = torch.rand(batch, heads, width, generator=gen) < 0.6
    keys = (torch.randn(batch, kv_heads, width + tail, dim, generator=gen) * 2).to(dtype)
    values = torch.randn(batch, kv_heads, width + tail, dim, generator=gen).to(dtype)
    query = (torch.randn(batch, kv_heads * groups, q_len, dim, generator=gen) * 2).to(dtype)
    labels = torch.full((batch, width), int(Modality.TEXT), dtype=torch.int8)
    positions = torch.arange(width).expand(batch, heads, width)
    state = LayerState(width, slots, labels, slots[:, 0].sum(-1), positions, width + 7, compacted=True)
    mask_2d = torch.ones(batch, width + 7 + tail, dtype=torch.long)
    if pad_tail:
        mask_2d[:, -tail:] = (torch.rand(batch, tail, generator=gen) < 0.7).long()
    return CompressedLayer(keys, values, state), query, mask_2d


def _reference(layer, query, mask_2d, scale, softcap):
    """Softmax over the padded layer with its padding slots, the tail's padding and the causal order masked:
    (output [B, Q, H, D], probabilities [B, H, Q, K + T]) in float32."""
    b, kv_heads, length, _ = layer.keys.shape
    heads, q_len = query.shape[1], query.shape[2]
    allowed = layer.state.decode_mask(query, layer.keys, mask_2d, eager=False)
    if allowed is None:
        allowed = torch.ones(b, heads, q_len, length, dtype=torch.bool)
    allowed = allowed.expand(b, heads, q_len, length)
    k = layer.keys.float().repeat_interleave(heads // kv_heads, 1)
    v = layer.values.float().repeat_interleave(heads // kv_heads, 1)
    scores = query.float() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    if softcap is None:
        sdpa = F.scaled_dot_product_attention(query.float(), k, v, attn_mask=allowed, scale=scale)
        seen = allowed.any(-1)[..., None]
        torch.testing.assert_close(torch.where(seen, sdpa, 0), probs @ v, atol=1e-5, rtol=1e-5)
    return (probs @ v).transpose(1, 2), probs, allowed.any(-1)


@SETTINGS
@given(case=flat_cases())
def test_flat_attention_equals_masked_attention_on_the_padded_layer(case):
    softcap, dtype = case[10], case[11]
    padded, query, mask_2d = _flat_case(case)
    layer = FlatLayer.from_padded(padded)
    real = int(padded.state.slots.expand(padded.keys.shape[0], padded.keys.shape[1], -1).sum())
    assert layer.flat_keys.shape[0] == real and layer.row_offsets[-1] == real
    module = types.SimpleNamespace(layer_idx=0, training=False)
    scale = 0.4
    ref_out, ref_probs, seen = _reference(padded, query, mask_2d, scale, softcap)
    for eager in (False, True):
        out, probs = flat_attention(
            module, query, layer, layer.keys, layer.values, mask_2d, eager, scaling=scale, softcap=softcap
        )
        assert out.dtype == dtype and out.shape == ref_out.shape
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        seen_out = seen.transpose(1, 2)[..., None]
        torch.testing.assert_close(torch.where(seen_out, out.float(), 0), ref_out, **tol)
        if eager:
            assert probs.shape == ref_probs.shape and probs.dtype == dtype
            torch.testing.assert_close(probs.float(), ref_probs, **tol)
        else:
            assert probs is None
    # the padded form it stands for holds the same real slots
    again = layer.padded()
    slots = padded.state.slots.expand(padded.keys.shape[0], padded.keys.shape[1], -1)
    base = padded.state.base_len
    assert torch.equal(again.keys[:, :, :base][slots], padded.keys[:, :, :base][slots])
    assert torch.equal(again.values[:, :, base:], padded.values[:, :, base:])


@pytest.mark.parametrize("eager", [False, True])
def test_long_later_prompts_are_taken_in_pieces(monkeypatch, eager):
    case = (2, 2, 3, 12, 11, 9, 8, False, True, True, None, torch.float32, 3)
    padded, query, mask_2d = _flat_case(case)
    layer = FlatLayer.from_padded(padded)
    module = types.SimpleNamespace(layer_idx=0, training=False)
    whole = flat_attention(module, query, layer, layer.keys, layer.values, mask_2d, eager, scaling=0.3)
    monkeypatch.setattr(flat_attention_module, "QUERY_CHUNK", 4)
    pieces = flat_attention(module, query, layer, layer.keys, layer.values, mask_2d, eager, scaling=0.3)
    torch.testing.assert_close(pieces[0], whole[0], atol=1e-6, rtol=0)
    if eager:
        torch.testing.assert_close(pieces[1], whole[1], atol=1e-6, rtol=0)
    ref_out, _, seen = _reference(padded, query, mask_2d, 0.3, None)
    torch.testing.assert_close(torch.where(seen.transpose(1, 2)[..., None], pieces[0], 0), ref_out, atol=1e-5, rtol=0)


def test_flat_attention_refuses_what_it_does_not_implement():
    padded, query, mask_2d = _flat_case((1, 2, 2, 6, 2, 1, 4, False, True, False, None, torch.float32, 0))
    layer = FlatLayer.from_padded(padded)
    module = types.SimpleNamespace(layer_idx=3, training=False)
    for extra in ({"sliding_window": 4}, {"s_aux": torch.zeros(4)}):
        with pytest.raises(ValueError, match="flat cache layout's attention does not implement"):
            flat_attention(module, query, layer, layer.keys, layer.values, None, False, **extra)
    module.training = True
    with pytest.raises(ValueError, match="eval"):
        flat_attention(module, query, layer, layer.keys, layer.values, None, False, dropout=0.1)
