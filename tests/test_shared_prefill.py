"""One prefill, many strategies: each strategy's compressed copy of a shared forward's cache equals what its own
prefill makes (kept positions, continuation), and evaluate_many on shared prefills equals separate runs."""

import pytest
import torch
from helpers import generate, rows_for, tiny

import kvpress_mm
from kvpress_mm.eval import evaluate, evaluate_many, get_task, load_model
from kvpress_mm.shared_prefill import SharedPrefill
from kvpress_mm.testing import TINY_FAMILIES

# per-layer, head-wise, cross-layer, replay, decode-phase and merging strategies
STRATEGIES = [
    ("snapkv", {}),
    ("h2o", {}),
    ("look_m", {}),
    ("pyramidkv", {}),
    ("adakv", {}),
    ("vl_cache", {}),
    ("madakv", {}),
    ("kvzip", {}),
    ("streaming_llm", {"phase": "both", "compress_every": 2}),
]
STEPS = 4


def _own_run(model, inputs, strategy):
    with strategy(model) as press:
        sequences, logits = generate(model, inputs, steps=STEPS)
    return sequences[:, inputs["input_ids"].shape[1] :].cpu(), logits.cpu(), press


def _check_same(prefill, model, inputs, strategy):
    tokens, logits, press = _own_run(model, inputs, strategy)
    cache, session = prefill.compress(strategy)
    assert sorted(session.kept) == sorted(press.kept)
    for idx in press.kept:
        assert torch.equal(session.kept[idx], press.kept[idx]), idx
    assert session.report.kept_fraction == pytest.approx(press.report.kept_fraction)
    got, got_logits = prefill.continue_generate(strategy, cache, STEPS, output_logits=True)
    assert torch.equal(got, tokens)
    # a strategy's own forward may compute a layer's attention in its statistics pass: rounding, not more
    torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_snapkv_on_a_shared_prefill_equals_its_own_prefill_on_every_family(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))  # a left-padded batch of two with images at different places
    prefill = SharedPrefill(t.model, inputs)
    _check_same(prefill, t.model, inputs, kvpress_mm.get_strategy("snapkv", budget=0.3))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_every_kind_of_strategy_on_one_shared_prefill(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    prefill = SharedPrefill(t.model, inputs)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in prefill.cache.layers]
    for name, fields in STRATEGIES:
        _check_same(prefill, t.model, inputs, kvpress_mm.get_strategy(name, budget=0.3, **fields))
    # every strategy compressed a copy: the shared full cache is as the forward left it
    for (keys, values), layer in zip(before, prefill.cache.layers):
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)


def test_the_full_cache_continuation_is_plain_generate_bit_for_bit():
    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t))
    sequences, logits = generate(t.model, inputs, steps=STEPS)
    prefill = SharedPrefill(t.model, inputs)
    got, got_logits = prefill.continue_generate(None, prefill.cache_copy(), STEPS, output_logits=True)
    assert torch.equal(got, sequences[:, inputs["input_ids"].shape[1] :].cpu())
    assert torch.equal(got_logits, logits.cpu())


def test_the_model_is_unchanged_and_unhooked_after_a_shared_prefill():
    t = tiny("qwen2_vl")
    inputs = t.make_inputs(rows_for(t))
    decoder = t.model.model.language_model
    backend = decoder.config._attn_implementation
    hooks = [(m, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in t.model.modules()]
    SharedPrefill(t.model, inputs)
    assert decoder.config._attn_implementation == backend
    assert all(dict(m._forward_hooks) == f and dict(m._forward_pre_hooks) == p for m, f, p in hooks)


def test_first_new_token_and_forced_continuation():
    """Teacher forcing through the continuation: the first forced token replaces the argmax, the rest go
    through the logits processor, and the logits are those of the forced path."""
    from transformers import LogitsProcessorList

    from kvpress_mm.context import ForcedTokens

    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    forced = torch.randint(3, 200, (2, STEPS))
    length = inputs["input_ids"].shape[1]
    strategy = kvpress_mm.get_strategy("snapkv", budget=0.4)
    with strategy(t.model):
        out = t.model.generate(
            **inputs,
            max_new_tokens=STEPS,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            logits_processor=LogitsProcessorList([ForcedTokens(forced, length)]),
        )
    prefill = SharedPrefill(t.model, inputs)
    cache, _ = prefill.compress(strategy)
    rest = LogitsProcessorList([ForcedTokens(forced[:, 1:], length + 1)])
    got, logits = prefill.continue_generate(
        strategy, cache, STEPS, first=forced[:, 0], output_logits=True, logits_processor=rest
    )
    assert torch.equal(got, forced)
    torch.testing.assert_close(logits, torch.stack(out.logits, 1).float(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- evaluate_many


@pytest.fixture(scope="module")
def bundle():
    return load_model("tiny_llava")


def _strip(result):
    keep = ("prediction", "full_prediction", "score", "full_score", "batch_kept_fraction", "id")
    return [{k: r.get(k) for k in keep} for r in result.samples]


@pytest.mark.parametrize(
    ("task_name", "protocol", "fields"),
    [
        ("text_needle", "question_aware", {"context_tokens": 120, "max_new_tokens": 5}),
        ("text_needle", "question_agnostic", {"context_tokens": 120, "max_new_tokens": 5, "num_questions": 2}),
        ("fidelity", "question_aware", {"max_new_tokens": 5}),
        ("fidelity", "question_agnostic", {"max_new_tokens": 5}),
    ],
)
def test_evaluate_many_on_shared_prefills_equals_separate_runs(bundle, task_name, protocol, fields):
    task = get_task(task_name, n_samples=3, **fields)
    strategies = [
        kvpress_mm.get_strategy("snapkv", budget=0.3),
        kvpress_mm.get_strategy("look_m", budget=0.2),
        kvpress_mm.get_strategy("pyramidkv", budget=0.3),
    ]
    options = dict(batch_size=2 if protocol == "question_aware" else 1, progress=False, protocol=protocol)
    likelihood = task_name == "text_needle"
    shared = evaluate_many(bundle, task, strategies, likelihood=likelihood, **options)
    assert [r.strategy for r in shared] == ["snapkv", "text_prior_pivot_merge", "pyramidkv"]  # look_m's defaults
    for strategy, got in zip(strategies, shared):
        alone = evaluate(bundle, task, strategy, likelihood=likelihood, share_prefill=False, **options)
        assert _strip(got) == _strip(alone)
        assert got.kept_fraction == pytest.approx(alone.kept_fraction)
        assert got.kv_bytes_after == pytest.approx(alone.kv_bytes_after)
        assert got.score == alone.score and got.n_contexts == alone.n_contexts
        for key in ("kl", "gold_logprob_drop", "gold_kl"):
            if key in alone.metrics:
                assert got.metrics[key] == pytest.approx(alone.metrics[key], abs=1e-4)
        assert "share_prefill" in got.notes and "share_prefill" not in alone.notes


def test_evaluate_many_runs_each_prefill_once(bundle, monkeypatch):
    from kvpress_mm import shared_prefill

    made = []
    original = shared_prefill.SharedPrefill.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(shared_prefill.SharedPrefill, "__init__", counting)
    task = get_task("fidelity", n_samples=3, max_new_tokens=3, seed=7)
    strategies = [kvpress_mm.get_strategy(n, budget=0.3) for n in ("snapkv", "h2o", "streaming_llm")]
    evaluate_many(bundle, task, strategies, batch_size=1, progress=False)
    assert len(made) == 3  # one per batch: the full cache and three strategies share it (the warm-up too)


def test_evaluate_many_checks_its_arguments(bundle):
    with pytest.raises(ValueError, match="at least one strategy"):
        evaluate_many(bundle, "fidelity", [], progress=False)
    with pytest.raises(ValueError, match="unknown strategy"):
        evaluate_many(bundle, "fidelity", ["snapkv", "snap"], progress=False)
