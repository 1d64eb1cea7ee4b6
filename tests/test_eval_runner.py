"""The runner on tiny random models: fidelity metric, teacher forcing through generate, result fields."""

from __future__ import annotations

import json

import pytest
import torch

import kvpress_mm
from kvpress_mm.eval import RunResult, evaluate, get_task, load_model
from kvpress_mm.eval import runner as runner_mod
from kvpress_mm.eval.metrics import fidelity, next_token_kl

CONTRACT_KEYS = {
    "score",
    "full_score",
    "kept_fraction",
    "kv_bytes_before",
    "kv_bytes_after",
    "prefill_seconds",
    "decode_tokens_per_second",
    "peak_memory_bytes",
    "n_samples",
    "samples",
    "notes",
}


@pytest.fixture(scope="module", autouse=True)
def _no_warmup():
    old = runner_mod.WARMUP_NEW_TOKENS
    runner_mod.WARMUP_NEW_TOKENS = 0
    yield
    runner_mod.WARMUP_NEW_TOKENS = old


@pytest.fixture(scope="module")
def llava():
    torch.set_num_threads(1)
    return load_model("tiny_llava")


@pytest.fixture(scope="module")
def fid_task():
    return get_task("fidelity", n_samples=3, num_images=2, context_tokens=150, max_new_tokens=8)


@pytest.fixture(scope="module")
def low_budget(llava, fid_task):
    return evaluate(llava, fid_task, kvpress_mm.get_strategy("snapkv", budget=0.1), progress=False)


def test_metric_basics():
    a = torch.randn(5, 50)
    assert fidelity(a, a.clone()) == {
        "kl": 0.0,
        "agreement": 1.0,
        "prefix_agreement": 1.0,
        "steps": 5,
        "matched_prefix": 5,
    }
    b = a.clone()
    b[2] = -b[2]
    m = fidelity(a, b)
    assert m["kl"] > 0 and m["agreement"] == pytest.approx(0.8) and m["prefix_agreement"] == pytest.approx(0.4)
    assert m["matched_prefix"] == 2
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[0.0, 1.0]])
    expected = 0.5 * torch.log(0.5 / torch.softmax(q, -1)).sum()
    assert float(next_token_kl(p, q)) == pytest.approx(float(expected))


@pytest.mark.parametrize(
    "strategy",
    [
        kvpress_mm.get_strategy("full"),
        kvpress_mm.get_strategy("snapkv", budget=1.0),
        kvpress_mm.get_strategy("h2o", budget=1.0),
    ],
)
def test_fidelity_is_exact_without_eviction(llava, fid_task, strategy):
    r = evaluate(llava, fid_task, strategy, progress=False)
    assert r.metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r.score == 1.0 and r.metrics["prefix_agreement"] == 1.0 and r.full_score == 1.0
    assert r.kept_fraction == 1.0 and r.kv_bytes_after == r.kv_bytes_before > 0
    assert all(s["prediction"] == s["full_prediction"] for s in r.samples)


def test_fidelity_drops_at_low_budget(low_budget):
    r = low_budget
    assert r.metrics["kl"] > 1e-4
    assert all(s["kl"] > 0 for s in r.samples)
    assert r.score < 1.0 and r.score == pytest.approx(sum(s["agreement"] for s in r.samples) / 3)
    assert r.kept_fraction == pytest.approx(0.1, abs=0.02)
    assert r.kv_bytes_after < 0.2 * r.kv_bytes_before


def test_result_fields_and_json(low_budget):
    r = low_budget
    assert isinstance(r, RunResult)
    d = r.to_dict()
    assert CONTRACT_KEYS <= set(d)
    json.loads(json.dumps(d, allow_nan=False))
    assert d["n_samples"] == len(d["samples"]) == 3
    assert d["model"] == "tiny_llava" and d["task"] == "fidelity" and d["strategy"] == "snapkv"
    assert d["strategy_config"]["budget"] == 0.1 and d["task_config"]["n_samples"] == 3
    assert d["prefill_seconds"] > 0 and d["decode_tokens_per_second"] > 0
    assert d["full_prefill_seconds"] > 0 and d["full_decode_tokens_per_second"] > 0
    assert d["peak_memory_bytes"] > 0 and d["memory_method"] != "none"
    assert d["peak_memory_increase_bytes"] is not None and d["peak_memory_increase_bytes"] >= 0
    assert "random" in d["notes"] and "KL" in d["notes"]
    for s in d["samples"]:
        assert {"id", "prompt_tokens", "prediction", "score", "kl", "agreement", "prefix_agreement"} <= set(s)
        assert s["steps"] == 8 and s["prompt_tokens"] > 100


def test_forcing_through_generate_reproduces_free_decoding(llava, fid_task):
    """Forcing a strategy's own greedy tokens gives back its own logits; forcing the full cache's tokens
    gives the free run's logits up to the first disagreement (positions and the compressed cache are right)."""
    strategy = kvpress_mm.get_strategy("snapkv", budget=0.15)
    inputs = llava.prepare(fid_task.samples()[:2])
    device = llava.device
    free = runner_mod._generate(llava, inputs, strategy, 8, device, logits=True)
    again = runner_mod._generate(llava, inputs, strategy, 8, device, force=free.new_tokens, logits=True)
    assert torch.equal(again.new_tokens, free.new_tokens)
    torch.testing.assert_close(again.logits, free.logits, rtol=1e-5, atol=1e-5)
    full = runner_mod._generate(llava, inputs, None, 8, device, logits=True)
    forced = runner_mod._generate(llava, inputs, strategy, 8, device, force=full.new_tokens, logits=True)
    assert torch.equal(forced.new_tokens, full.new_tokens)
    for b in range(2):
        same = (free.new_tokens[b] == full.new_tokens[b]).long().cumprod(0)
        k = int(same.sum()) + 1 if int(same.sum()) < 8 else 8  # steps whose inputs agree
        torch.testing.assert_close(forced.logits[b, :k], free.logits[b, :k], rtol=1e-5, atol=1e-5)
    assert free.report.after_bytes < free.report.before_bytes


def test_batched_run_matches_single_rows(llava, fid_task, low_budget):
    batched = evaluate(llava, fid_task, kvpress_mm.get_strategy("snapkv", budget=0.1), batch_size=2, progress=False)
    assert batched.batch_size == 2 and batched.n_samples == 3
    for a, b in zip(low_budget.samples, batched.samples):
        assert a["id"] == b["id"] and a["prompt_tokens"] == b["prompt_tokens"]
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-6)
    assert batched.kept_fraction == pytest.approx(low_budget.kept_fraction, abs=0.01)


def test_generate_task_on_tiny_model(llava):
    task = get_task("text_needle", n_samples=2, num_images=1, context_tokens=80, max_new_tokens=4)
    r = evaluate(llava, task, kvpress_mm.get_strategy("streaming_llm", budget=0.3), batch_size=2, progress=False)
    assert r.task == "text_needle" and r.strategy == "streaming_llm" and r.n_samples == 2
    assert r.full_score is not None and 0.0 <= r.score <= 1.0
    assert all(s["prediction"].startswith("<") and s["full_prediction"] for s in r.samples)
    assert r.kv_bytes_after < r.kv_bytes_before
    no_full = evaluate(llava, task, "streaming_llm", compare_full=False, progress=False)  # by name: budget 1.0
    assert no_full.full_score is None and all(s["full_prediction"] is None for s in no_full.samples)
    assert no_full.full_prefill_seconds is None and "compare_full=False" in no_full.notes
    json.dumps(no_full.to_dict(), allow_nan=False)


def test_other_families_and_strategy_names():
    bundle = load_model("tiny_qwen2_vl")
    task = get_task("fidelity", n_samples=2, num_images=1, context_tokens=60, max_new_tokens=4)
    full = evaluate(bundle, task, None, batch_size=2, progress=False)
    assert full.strategy == "full" and full.metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    low = evaluate(bundle, task, kvpress_mm.get_strategy("text_prior_pivot_merge", budget=0.2), progress=False)
    assert low.strategy == "text_prior_pivot_merge" and low.metrics["kl"] > 0


def test_bad_arguments(llava, fid_task):
    with pytest.raises(ValueError, match="registered strategies: .*snapkv"):
        evaluate(llava, fid_task, "snap", progress=False)
    with pytest.raises(ValueError, match="available tasks"):
        evaluate(llava, "needle", "full", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(llava, fid_task, "full", batch_size=0, progress=False)
    with pytest.raises(TypeError, match="strategy"):
        evaluate(llava, fid_task, 0.5, progress=False)


def test_full_cache_reference_runs_once_per_batch_in_a_sweep(monkeypatch):
    from kvpress_mm.eval import evaluate, get_task, load_model, runner

    bundle = load_model("tiny_llava")
    task = get_task("fidelity", n_samples=2, max_new_tokens=3)
    calls = []
    original = runner._generate

    def counting(bundle_, inputs, strategy, *args, **kwargs):
        calls.append(strategy is None)
        return original(bundle_, inputs, strategy, *args, **kwargs)

    monkeypatch.setattr(runner, "_generate", counting)
    first = evaluate(bundle, task, "snapkv", progress=False)
    full_runs = calls.count(True)
    second = evaluate(bundle, task, "h2o", progress=False)
    assert full_runs >= 2 and calls.count(True) <= full_runs + 1  # at most a warm-up again, no full references
    assert [r["full_prediction"] for r in first.samples] == [r["full_prediction"] for r in second.samples]
