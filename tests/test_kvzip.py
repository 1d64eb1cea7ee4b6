"""KVzip: replay scores against the eager probabilities, the compressed cache against masked references."""

from __future__ import annotations

import copy

import pytest
import torch
from conversation import HeldReference, turn_ids
from helpers import generate, masked_reference_generate, rows_for, tiny
from kvpress_mm.strategies.kvzip import REPEAT, REPEAT_FROM

import kvpress_mm
from kvpress_mm.adapters import adapter_for
from kvpress_mm.backend import set_decoder_attention
from kvpress_mm.modality import Modality

FAKE_IDS = {REPEAT: [11, 12, 13, 14], REPEAT_FROM: [11, 12, 13, 15, 16], ":": [17]}


class FakeTokenizer:
    """The repeat prompts as fixed ids (the tiny models have no tokenizer)."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(FAKE_IDS[text])}


def _kvzip(**fields):
    strategy = kvpress_mm.get_strategy("kvzip", **fields)
    strategy.tokenizer = FakeTokenizer()
    return strategy


def _text_ids(t, inputs, b):
    """The real text tokens of row b, in order (the replay repeats text only)."""
    ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
    keep = mask.clone()
    for special in (t.image_token_id, t.video_token_id):
        if special is not None:
            keep &= ids != special
    return ids[keep].tolist()


def _reference_rounds(t, inputs, chunk_size, overlap=8):
    """(ids, spans) of every round per row, built from the paper's Algorithm 1 directly."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    length = ids.shape[1]
    rounds = []
    for b in range(ids.shape[0]):
        start = int((~mask[b]).sum())
        n = length - start
        for r, s in enumerate(range(start, start + n, chunk_size)):
            e = min(length, s + chunk_size)
            part = {**inputs, "input_ids": ids[:, s:e], "attention_mask": mask[:, s:e]}
            text = _text_ids(t, part, b)
            if r == 0:
                prefix = FAKE_IDS[REPEAT]
            else:
                before = slice(s - chunk_size, s)
                prev = {**inputs, "input_ids": ids[:, before], "attention_mask": mask[:, before]}
                prefix = FAKE_IDS[REPEAT_FROM] + _text_ids(t, prev, b)[-overlap:] + FAKE_IDS[":"]
            rounds.append((b, r, prefix + text, (s, e)))
    return rounds


def _eager_reference_scores(t, inputs, chunk_size):
    """layer -> [B, Hkv, L] from the eager probabilities of each replay, row by row, in Python loops.

    The batch is prefilled as generate does (positions from the mask); each round of a row then runs on a copy of
    that row's cache with output_attentions; a round's statistics softmax covers its chunk's keys and its own,
    which is the eager softmax renormalised over those keys."""
    model = t.model
    decoder = adapter_for(model).decoder(model)
    config = model.config.get_text_config()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    groups = heads // kv_heads
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b_size, length = ids.shape
    n_layers = config.num_hidden_layers
    scores = {i: torch.zeros((b_size, kv_heads, length)) for i in range(n_layers)}
    original = decoder.config._attn_implementation
    set_decoder_attention(model, decoder, "eager")
    try:
        with torch.no_grad():
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            prefill = model(**inputs, position_ids=positions, use_cache=True).cache
        for b, _, replay, (s, e) in _reference_rounds(t, inputs, chunk_size):
            cache = copy.deepcopy(prefill)
            cache.batch_select_indices(torch.tensor([b]))
            r = len(replay)
            n_real = int(mask[b].sum())
            with torch.no_grad():
                out = model(
                    input_ids=torch.tensor([replay]),
                    attention_mask=torch.cat([mask[b : b + 1], torch.ones((1, r), dtype=mask.dtype)], dim=1),
                    position_ids=torch.arange(n_real, n_real + r)[None],
                    cache=cache,
                    use_cache=True,
                    output_attentions=True,
                )
            for layer, probs in enumerate(out.attentions):
                probs = probs[0].float()  # [H, R, L + R]
                for h in range(heads):
                    for q in range(r):
                        row_p = probs[h, q]
                        sub = row_p[s:e].sum() + row_p[length:].sum()
                        for j in range(s, e):
                            value = float(row_p[j] / sub)
                            kv = h // groups
                            if value > scores[layer][b, kv, j]:
                                scores[layer][b, kv, j] = value
    finally:
        set_decoder_attention(model, decoder, original)
    return scores


@pytest.mark.parametrize("family, chunk_size", [("llama", 2048), ("llama", 16), ("llava", 2048), ("llava", 20)])
def test_replay_scores_equal_the_eager_probabilities(family, chunk_size):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    strategy = _kvzip(budget=0.3, chunk_size=chunk_size)
    with strategy(t.model) as session:
        generate(t.model, inputs, steps=1)
    reference = _eager_reference_scores(t, inputs, chunk_size)
    kv_heads = reference[0].shape[1]
    for layer, ref in reference.items():
        got = session.replay_scores[layer]
        b, h, length = got.shape
        got = got.view(b, kv_heads, h // kv_heads, length).amax(2)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_rounds_follow_algorithm_one():
    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t))
    strategy = _kvzip(chunk_size=20)
    modality = adapter_for(t.model).modality(t.model, inputs["input_ids"], inputs["attention_mask"], inputs)
    rounds = strategy.replay_rounds(inputs["input_ids"], modality, t.model)
    expected = _reference_rounds(t, inputs, 20)
    for b, r, ids, span in expected:
        rnd = rounds[r]
        assert rnd.ids[b][rnd.valid[b]].tolist() == ids
        assert tuple(rnd.span[b].tolist()) == span
    # instruction="none" replays the context's text alone
    plain = kvpress_mm.get_strategy("kvzip", instruction="none").replay_rounds(inputs["input_ids"], modality, t.model)
    text = (modality == int(Modality.TEXT))[0]
    assert plain[0].ids[0][plain[0].valid[0]].tolist() == inputs["input_ids"][0][text].tolist()


FAMILIES = ["llama", "llava", "qwen2_vl", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head_budgets", ["model", "layer", "uniform"])
def test_padded_generate_equals_the_masked_full_cache(family, head_budgets):
    """Inside generate() on a left-padded batch: decoding on the compressed cache equals the full cache with the
    evicted pairs masked; each allocation keeps what it promises."""
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    strategy = _kvzip(budget=0.3, head_budgets=head_budgets)
    with strategy(t.model) as session:
        tokens, logits = generate(t.model, inputs, steps=5)
    assert session.compressed_any
    kept = dict(session.kept)
    ref_tokens, ref_logits = masked_reference_generate(t.model, inputs, kept, steps=5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    n_valid = inputs["attention_mask"].sum(-1)
    uniform = strategy.kept_counts(n_valid, 0, len(kept))
    per_layer = torch.stack([k.expand(-1, 2, -1).sum(-1) for k in kept.values()])  # [layers, B, Hkv]
    if head_budgets == "uniform":
        assert bool((per_layer == uniform[None, :, None]).all())
    elif head_budgets == "layer":
        assert torch.equal(per_layer.sum(-1), uniform[None].expand(len(kept), -1) * 2)
    else:
        assert torch.equal(per_layer.sum((0, 2)), uniform * 2 * len(kept))
    # within a layer, every kept pair scores at least as high as every evicted one (bar each head's best)
    if head_budgets == "layer":
        for idx, keep in kept.items():
            s = session.replay_scores[idx]
            b, h, length = s.shape
            s = s.view(b, 2, h // 2, length).amax(2)
            real = inputs["attention_mask"].bool()[:, None, :].expand_as(s)
            for row in range(b):
                k, r = keep[row].expand(2, -1), real[row]
                if (~k & r).any():
                    assert s[row][k].min() >= s[row][~k & r].max() or bool((keep[row].sum(-1) <= 1).any())


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_budget_one_is_token_identical(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    ref, ref_logits = generate(t.model, inputs, steps=6)
    with _kvzip(budget=1.0)(t.model):
        tokens, logits = generate(t.model, inputs, steps=6)
    assert torch.equal(tokens, ref)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_once_ask_many_equals_the_masked_reference(family):
    """The question-agnostic use: compress the context, then each question on the compressed cache equals the full
    cache with the evicted pairs hidden; the replay leaves no trace (logical length = the context's)."""
    t = tiny(family)
    rows = [[("text", 9), ("image",), ("text", 14), ("image",), ("text", 6)]] if t.image_token_id else [[("text", 60)]]
    inputs = t.make_inputs(rows)
    context = kvpress_mm.compress_context(t.model, _kvzip(budget=0.3), inputs)
    length = inputs["input_ids"].shape[1]
    assert context.cache.compacted
    assert context.cache.get_seq_length() == length
    assert all(layer.keys.shape[2] <= length for layer in context.cache.layers)
    questions = [turn_ids(t, 1, n, seed=50 + n)[0] for n in (5, 7)]
    answers = context.ask(questions, max_new_tokens=4, output_logits=True)
    held = [{i: k.clone() for i, k in context.cache.kept_positions().items()}]
    for question, answer in zip(questions, answers):
        ids = torch.cat([inputs["input_ids"], question[None]], dim=1)
        extra = {
            k: torch.cat([v, v.new_zeros((1, question.numel()))], dim=1)
            for k, v in inputs.items()
            if k in ("mm_token_type_ids", "token_type_ids")
        }
        with torch.no_grad():
            prefill = t.model(**inputs, use_cache=True)
        with HeldReference(t.model, held, first_forward=1):
            out = t.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                cache=prefill.cache,
                max_new_tokens=4,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                **extra,
            )
        torch.testing.assert_close(answer.logits, torch.stack(out.logits, 1)[0].float(), atol=1e-4, rtol=0)


def test_replay_leaves_sliding_layers_as_prefilled():
    """Gemma3's sliding-window layers (left uncompressed) hold exactly the prefill's window after the replay."""
    t = tiny("gemma3")
    inputs = t.make_inputs(rows_for(t))
    with torch.no_grad():
        plain = t.model(**inputs, use_cache=True).cache
    with _kvzip(budget=0.3)(t.model) as session, torch.no_grad():
        compressed = t.model(**inputs, use_cache=True).cache
    sliding = adapter_for(t.model).sliding_layers(t.model)
    assert sliding and session.replay_scores
    for i in sliding:
        assert torch.equal(compressed.layers[i].keys, plain.layers[i].keys)
        assert torch.equal(compressed.layers[i].values, plain.layers[i].values)


def test_qwen_vl_replay_positions_follow_m_rope():
    """The replay continues Qwen-VL's M-RoPE positions the same way from generate's position ids and from the
    model's rope_deltas (a plain forward): the same scores."""
    t = tiny("qwen2_vl")
    inputs = t.make_inputs(rows_for(t))  # a left-padded batch: the rows' deltas differ
    strategy = _kvzip(budget=0.3)
    with strategy(t.model) as session:
        generate(t.model, inputs, steps=1)
    from_generate = dict(session.replay_scores)
    with strategy(t.model) as session, torch.no_grad():
        t.model(**inputs, use_cache=True)
    for i, scores in session.replay_scores.items():
        torch.testing.assert_close(scores, from_generate[i], atol=1e-5, rtol=0)


def test_plan_without_replay_statistics_and_every_prompt_warning():
    with pytest.warns(UserWarning, match="first prompt only"):
        kvpress_mm.get_strategy("kvzip", compress="every_prompt")
    with pytest.raises(ValueError, match="head_budgets"):
        kvpress_mm.get_strategy("kvzip", head_budgets="global")


def _vision_mask(t, inputs):
    ids = inputs["input_ids"]
    vision = torch.zeros_like(ids, dtype=torch.bool)
    for special in (t.image_token_id, t.video_token_id):
        if special is not None:
            vision |= ids == special
    return vision


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("head_budgets", ["model", "layer", "uniform"])
def test_proportional_modality_budgets_keep_each_modality_its_share(family, head_budgets):
    """modality_budgets="proportional": text and vision keep budget shares in proportion to their real tokens
    (summed over what the allocation covers: a head, a layer or the model), each by its own replay ranking;
    decoding still equals the masked full cache."""
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    strategy = _kvzip(budget=0.3, head_budgets=head_budgets, modality_budgets="proportional")
    with strategy(t.model) as session:
        tokens, logits = generate(t.model, inputs, steps=4)
    kept = dict(session.kept)
    ref_tokens, ref_logits = masked_reference_generate(t.model, inputs, kept, steps=4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    real = inputs["attention_mask"].bool()
    vision = _vision_mask(t, inputs) & real
    text = real & ~vision
    stacked = torch.stack([k.expand(-1, 2, -1) for k in kept.values()])  # [layers, B, Hkv, S]
    kept_vision = (stacked & vision[None, :, None, :]).sum(-1)  # [layers, B, Hkv]
    kept_all = stacked.sum(-1)
    # the share of vision among the kept pairs is the share of vision among the real tokens (up to rounding:
    # one pair per head, and "every head keeps its best pair" in the head-wise allocations)
    share = vision.sum(-1).double() / real.sum(-1)  # [B]
    if head_budgets == "uniform":  # per (layer, row, head)
        got, total, slack = kept_vision, kept_all, 1
        expected = total.double() * share[None, :, None]
    elif head_budgets == "layer":  # per (layer, row)
        got, total, slack = kept_vision.sum(2), kept_all.sum(2), 2 * 2
        expected = total.double() * share[None, :]
    else:  # per row, over every layer and head
        got, total, slack = kept_vision.sum((0, 2)), kept_all.sum((0, 2)), 2 * 2 * len(kept)
        expected = total.double() * share
    assert bool(((got.double() - expected).abs() <= slack).all()), (got, expected)
    # within each modality the kept pairs are its best by the replay (uniform: per head)
    if head_budgets == "uniform":
        for idx, keep in kept.items():
            s = session.replay_scores[idx]
            b, h, length = s.shape
            s = s.view(b, 2, h // 2, length).amax(2)
            for row in range(b):
                for group in (vision[row], text[row]):
                    for head in range(2):
                        k = keep[row, min(head, keep.shape[1] - 1)] & group
                        e = ~keep[row, min(head, keep.shape[1] - 1)] & group
                        if k.any() and e.any():
                            assert s[row, head][k].min() >= s[row, head][e].max()


def test_proportional_equals_shared_on_text_only_prompts():
    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    kept = []
    for modality_budgets in ("shared", "proportional"):
        with _kvzip(budget=0.3, modality_budgets=modality_budgets)(t.model) as session:
            generate(t.model, inputs, steps=2)
        kept.append(session.kept)
    assert all(torch.equal(kept[0][i], kept[1][i]) for i in kept[0])
