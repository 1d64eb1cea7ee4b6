"""Gold-answer metrics: teacher-forced log-likelihood of the gold answer and the KL to the full cache."""

import pytest
import torch

import kvpress_mm
from kvpress_mm.eval import evaluate, get_task, load_model
from kvpress_mm.eval.protocol import split_questions


@pytest.fixture(scope="module")
def bundle():
    return load_model("tiny_llava")


def _forward_logprob(bundle, sample) -> float:
    """log p(gold | prompt) from one plain forward over prompt + gold ids (no generate, no cache reuse)."""
    inputs = bundle.prepare([sample])
    gold = torch.tensor(bundle.encode(sample.answer), dtype=torch.long)
    ids = torch.cat([inputs["input_ids"], gold[None]], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    mask = torch.cat([inputs["attention_mask"], torch.ones((1, gold.numel()), dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = bundle.model(input_ids=ids, attention_mask=mask, **extra).logits[0].double()
    start = inputs["input_ids"].shape[1] - 1
    logprobs = torch.log_softmax(logits[start : start + gold.numel()], -1)
    return float(logprobs.gather(-1, gold[:, None]).sum())


@pytest.mark.parametrize("protocol", ["question_aware", "question_agnostic"])
def test_full_cache_gold_logprob_equals_a_plain_forward(bundle, protocol):
    task = get_task("text_needle", n_samples=2, context_tokens=120, max_new_tokens=4)
    result = evaluate(
        bundle, task, kvpress_mm.get_strategy("snapkv", budget=0.3), protocol=protocol, progress=False, likelihood=True
    )
    for record, sample in zip(result.samples, task.samples()):
        assert abs(record["full_gold_logprob"] - _forward_logprob(bundle, sample)) < 1e-3
    assert result.metrics["gold_kl"] >= 0 and result.metrics["gold_logprob_drop_ci"] is not None


def test_budget_one_has_no_drop_and_no_kl(bundle):
    task = get_task("text_needle", n_samples=2, context_tokens=120, max_new_tokens=4)
    for protocol in ("question_aware", "question_agnostic"):
        result = evaluate(
            bundle, task, kvpress_mm.get_strategy("h2o", budget=1.0), protocol=protocol, progress=False, likelihood=True
        )
        assert abs(result.metrics["gold_logprob_drop"]) < 1e-5 and result.metrics["gold_kl"] < 1e-8


def test_question_agnostic_eviction_moves_the_gold_likelihood(bundle):
    """With the question outside the compressed prompt the answer's first token already reads the compressed
    cache, so eviction shows in the continuous metrics even where exact match cannot tell."""
    task = get_task("text_needle", n_samples=3, context_tokens=200, max_new_tokens=4)
    result = evaluate(
        bundle,
        task,
        kvpress_mm.get_strategy("streaming_llm", budget=0.1),
        protocol="question_agnostic",
        progress=False,
        likelihood=True,
    )
    assert result.metrics["gold_kl"] > 1e-4
    sample = task.samples()[0]
    split = split_questions(bundle, sample)
    assert split.questions[0].numel() > 0


def test_likelihood_is_off_by_default(bundle):
    task = get_task("text_needle", n_samples=1, context_tokens=100, max_new_tokens=2)
    result = evaluate(bundle, task, "snapkv", progress=False)
    assert "gold_kl" not in result.metrics and "gold_logprob" not in result.samples[0]
