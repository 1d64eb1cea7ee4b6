"""Compress once, ask many: one compressed context, several questions, each on its own copy of the cache."""

import pytest
import torch
from conversation import HeldReference, turn_ids
from helpers import tiny

import kvpress_mm
from kvpress_mm.testing import TINY_FAMILIES

CONTEXT = {True: [[("text", 9), ("image",), ("text", 14), ("image",), ("text", 6)]], False: [[("text", 60)]]}


def _setup(family, name="snapkv", **fields):
    t = tiny(family)
    inputs = t.make_inputs(CONTEXT[t.image_token_id is not None])
    strategy = kvpress_mm.get_strategy(name, budget=0.3, **fields)
    context = kvpress_mm.compress_context(t.model, strategy, inputs)
    questions = [turn_ids(t, 1, n, seed=40 + n)[0] for n in (5, 8, 3)]
    return t, inputs, strategy, context, questions


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batched_questions_equal_one_at_a_time_and_do_not_interact(family):
    t, inputs, strategy, context, questions = _setup(family)
    assert context.cache.compacted
    batched = context.ask(questions, max_new_tokens=4, output_logits=True)
    single = context.ask(questions, max_new_tokens=4, batch_size=1, output_logits=True)
    alone = context.ask(questions[1:2], max_new_tokens=4, output_logits=True)
    for a, b in zip(batched, single):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
        assert torch.equal(a.tokens, b.tokens)
    # question 2 is unaffected by question 1 having been asked on the same context
    torch.testing.assert_close(batched[1].logits, alone[0].logits, atol=1e-4, rtol=0)
    # the shared compressed cache itself is untouched by the questions
    assert context.cache.get_seq_length() == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "llama"])
def test_answers_equal_the_masked_reference(family):
    t, inputs, strategy, context, questions = _setup(family)
    answers = context.ask(questions[:1], max_new_tokens=4, output_logits=True)
    held = [{i: k.clone() for i, k in context.cache.kept_positions().items()}]
    ids = torch.cat([inputs["input_ids"], questions[0][None]], dim=1)
    mask = torch.ones_like(ids)
    extra = {
        k: torch.cat([v, v.new_zeros((1, questions[0].numel()))], dim=1)
        for k, v in inputs.items()
        if k in ("mm_token_type_ids", "token_type_ids")
    }
    with torch.no_grad():  # an uncompressed prefill of the context, then the question on the full cache
        prefill = t.model(**inputs, use_cache=True)
    with HeldReference(t.model, held, first_forward=1):
        out = t.model.generate(
            input_ids=ids,
            attention_mask=mask,
            cache=prefill.cache,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **extra,
        )
    torch.testing.assert_close(answers[0].logits, torch.stack(out.logits, 1)[0].float(), atol=1e-4, rtol=0)


def test_questions_do_not_rerun_the_context():
    t, inputs, strategy, context, questions = _setup("llava")
    fed = []
    handle = t.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        context.ask(questions, max_new_tokens=2)
    finally:
        handle.remove()
    assert fed == [torch.Size([3, 8]), torch.Size([3, 1])]  # the padded questions, then one decode step


def test_bad_arguments_are_named():
    t, inputs, strategy, context, questions = _setup("llama")
    with pytest.raises(ValueError, match=r"question 1: expected a non-empty 1-D"):
        context.ask([questions[0], []])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        context.ask(questions, batch_size=0)
    batch = t.make_inputs([[("text", 9)], [("text", 7)]])
    with pytest.raises(ValueError, match=r"shape \[1, L\]; got \(2, 9\)"):
        kvpress_mm.compress_context(t.model, strategy, batch)


def test_gemma3_batches_questions_of_one_length():
    """Sliding-window layers: questions of one length share a generate call (rows of one cache copy each),
    a question of another length gets its own; the answers equal the questions asked one at a time."""
    t, inputs, strategy, context, _ = _setup("gemma3")
    questions = [turn_ids(t, 1, n, seed=60 + i)[0] for i, n in enumerate((6, 6, 4, 6))]
    fed = []
    handle = t.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        batched = context.ask(questions, max_new_tokens=2, output_logits=True)
    finally:
        handle.remove()
    assert fed == [torch.Size([3, 6]), torch.Size([3, 1]), torch.Size([1, 4]), torch.Size([1, 1])]
    single = context.ask(questions, max_new_tokens=2, batch_size=1, output_logits=True)
    for a, b in zip(batched, single):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
        assert torch.equal(a.tokens, b.tokens)


def test_a_context_keeps_its_m_rope_offset_when_another_was_compressed_since():
    """Qwen-VL keeps the last prompt's M-RoPE offset on the model: asking context A again after compressing
    B (another image layout, another offset) gives A's first answers (A's cache brings its own offset)."""
    t, inputs, strategy, context, questions = _setup("qwen2_vl")
    first = context.ask(questions[:2], max_new_tokens=3, output_logits=True)
    other = kvpress_mm.compress_context(t.model, strategy, t.make_inputs([[("image",), ("text", 30)]], seed=3))
    assert not torch.equal(other.cache.rope_deltas, context.cache.rope_deltas)
    again = context.ask(questions[:2], max_new_tokens=3, output_logits=True)
    for a, b in zip(first, again):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
        assert torch.equal(a.tokens, b.tokens)
