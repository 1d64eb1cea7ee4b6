"""Model bundles: names and options, tiny pseudo-tokenizer inputs, the hub loader offline."""

from __future__ import annotations

import pytest
import torch

from kvpress_mm.eval import ModelBundle, list_models, load_model, model_options
from kvpress_mm.eval.models.tiny import text_ids
from kvpress_mm.eval.sample import Sample
from kvpress_mm.eval.tasks.images import synthetic_image
from kvpress_mm.testing import TINY_FAMILIES, build_tiny


def test_list_models_covers_every_tiny_family():
    names = list_models()
    assert {"mini_llava", "hub"} <= set(names)
    assert {f"tiny_{f}" for f in TINY_FAMILIES} <= set(names)


def test_unknown_model_and_option_errors_list_the_options():
    with pytest.raises(ValueError, match="available models: .*hub.*mini_llava.*tiny_llava"):
        load_model("llava-7b")
    with pytest.raises(ValueError, match=r"no option\(s\) device_map; its options are: dtype, device, seed"):
        load_model("tiny_llava", device_map="auto")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model("tiny_llava", dtype="float8")
    assert "model_id" in model_options("hub") and "projector_path" in model_options("mini_llava")


def test_hub_needs_a_model_id():
    with pytest.raises(ValueError, match="needs model_id"):
        load_model("hub")


def test_hub_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not be loaded.*local folder"):
        load_model("hub", model_id="no-such-org/no-such-model-kvpress-mm")
    with pytest.raises(OSError, match="could not be loaded: the folder has no config.json"):
        load_model("hub", model_id=str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "no_such_architecture"}')
    with pytest.raises(ValueError, match="no_such_architecture"):
        load_model("hub", model_id=str(tmp_path))


def _samples(n_images: int = 2) -> list[Sample]:
    import random

    rng = random.Random(0)
    return [
        Sample("a", ["one two three four", synthetic_image(rng), "five six"], ""),
        Sample(
            "b",
            ["seven", synthetic_image(rng), "eight nine ten eleven twelve", synthetic_image(rng), "x y"][
                : 3 + n_images
            ],
            "",
        ),
        Sample("c", ["only text here"], ""),
    ]


@pytest.fixture(scope="module")
def bundles():
    return {f: load_model(f"tiny_{f}") for f in ("llava", "qwen2_vl", "idefics3", "gemma3", "llama")}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "gemma3", "llama"])
def test_tiny_prepare_is_deterministic_and_batch_invariant(bundles, family):
    bundle = bundles[family]
    assert isinstance(bundle, ModelBundle) and bundle.trained is False and "random" in bundle.notes
    samples = _samples()
    batch = bundle.prepare(samples)
    again = bundle.prepare(samples)
    assert batch.keys() == again.keys() and all(torch.equal(batch[k], again[k]) for k in batch)
    # same keys and layout as the family's own make_inputs
    tiny = build_tiny(family)
    rows = [[("text", 1), ("image",)], [("image",), ("text", 2), ("image",)], [("text", 3)]]
    if tiny.image_token_id is None:  # a text-only family
        rows = [[("text", 1)], [("text", 2)], [("text", 3)]]
    assert set(batch) == set(tiny.make_inputs(rows))
    lengths = batch["attention_mask"].sum(-1)
    # each row equals the sample prepared alone (left padding only adds pad columns)
    for b, s in enumerate(samples):
        alone = bundle.prepare([s])
        n = int(lengths[b])
        assert torch.equal(batch["input_ids"][b, -n:], alone["input_ids"][0])
        assert torch.equal(batch["attention_mask"][b, :-n], torch.zeros_like(batch["attention_mask"][b, :-n]))
    # text words map to ids in the family's text range, the same word to the same id
    low, high = tiny.extra["text_id_range"]
    ids = text_ids("one two one", (low, high))
    assert ids[0] == ids[2] and all(low <= i < high for i in ids)
    out = bundle.model.generate(**batch, max_new_tokens=2, do_sample=False, **bundle.generate_kwargs)
    assert out.shape[0] == 3
    texts = bundle.decode(out[:, batch["input_ids"].shape[1] :])
    assert len(texts) == 3 and all(t.startswith("<") for t in texts)


def test_tiny_images_become_placeholders(bundles):
    bundle = bundles["llava"]
    tiny = build_tiny("llava")
    batch = bundle.prepare(_samples())
    per_row = (batch["input_ids"] == tiny.image_token_id).sum(-1).tolist()
    assert per_row == [tiny.tokens_per_image, 2 * tiny.tokens_per_image, 0]
    assert batch["pixel_values"].shape[0] == 3


def test_per_row_pixels_come_from_the_tiny_model(monkeypatch):
    """How a family's pixels are batched is its TinyModel's per_row_pixels, not a list of family names: the
    idefics3 builder registered under another name batches its per-row pixels as tiny_idefics3 does."""
    from kvpress_mm.eval.models.tiny import load_tiny_bundle
    from kvpress_mm.testing.tiny import BUILDERS

    assert build_tiny("idefics3").per_row_pixels == ("pixel_values", "pixel_attention_mask")
    monkeypatch.setitem(BUILDERS.entries, "idefics3_renamed", BUILDERS.get("idefics3"))
    renamed, original = load_tiny_bundle("idefics3_renamed"), load_model("tiny_idefics3")
    samples = _samples()
    got, want = renamed.prepare(samples), original.prepare(samples)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert got["pixel_values"].shape[:2] == (3, 2 * build_tiny("idefics3").extra["sub_images_per_image"])
