"""The `hub` loader end to end, offline: tiny random models saved to a local folder with a real tokenizer
(mini_llava's SmolLM2 tokenizer, which has an <image> token) and a processor, loaded back through
load_model("hub", model_id=<folder>) exactly as a hub checkpoint would be.
"""

from __future__ import annotations

import pytest
import torch

import kvpress_mm
from kvpress_mm.eval import evaluate, get_task, load_model
from kvpress_mm.eval import runner as runner_mod

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kvpress_mm.offline import is_current, mini_llava_dir

    if not is_current(mini_llava_dir()):
        pytest.skip("needs the built mini_llava folder (for an offline tokenizer)")
    return AutoTokenizer.from_pretrained(str(mini_llava_dir()))


def _text_config(vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )


@pytest.fixture(scope="module")
def vlm_folder(tokenizer, tmp_path_factory):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    folder = tmp_path_factory.mktemp("tiny_llava_hub")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            projection_dim=32,
        ),
        text_config=LlamaConfig(**_text_config(len(tokenizer))),
        image_token_index=image_id,
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


def test_hub_vlm_from_a_local_folder(vlm_folder, monkeypatch):
    monkeypatch.setattr(runner_mod, "WARMUP_NEW_TOKENS", 0)
    bundle = load_model("hub", model_id=str(vlm_folder), dtype="float32")
    assert bundle.info["class"] == "LlavaForConditionalGeneration" and not bundle.info["text_only"]
    task = get_task("fidelity", n_samples=2, num_images=2, context_tokens=60, max_new_tokens=4)
    inputs = bundle.prepare(task.samples())
    image_id = bundle.model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum(-1).tolist() == [32, 32]  # 2 images x 16 tokens per row
    assert inputs["pixel_values"].shape == (4, 3, 16, 16)
    lengths = inputs["attention_mask"].sum(-1)
    assert lengths[0] != lengths[1] and inputs["attention_mask"][:, -1].all()  # left padded
    full = evaluate(bundle, task, "full", batch_size=2, progress=False)
    assert full.metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    low = evaluate(bundle, task, kvpress_mm.get_strategy("snapkv", budget=0.2), batch_size=2, progress=False)
    assert low.kept_fraction == pytest.approx(0.2, abs=0.02) and low.metrics["kl"] > 0


def test_hub_text_lm_from_a_local_folder(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**_text_config(len(tokenizer)))).save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    bundle = load_model("hub", model_id=str(tmp_path))
    assert bundle.info["text_only"]
    samples = get_task("text_needle", n_samples=2, num_images=0, context_tokens=50).samples()
    inputs = bundle.prepare(samples)
    assert inputs["input_ids"].shape[0] == 2 and inputs["attention_mask"][:, -1].all()
    out = bundle.model.generate(**inputs, max_new_tokens=2, do_sample=False, **bundle.generate_kwargs)
    assert len(bundle.decode(out[:, inputs["input_ids"].shape[1] :])) == 2
    with pytest.raises(ValueError, match="text-only"):
        bundle.prepare(get_task("text_needle", n_samples=1, num_images=1, context_tokens=50).samples())
