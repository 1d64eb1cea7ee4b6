"""Tiny random-weight InternVL (InternVL3-style: InternViT + pixel-shuffle MLP projector + Qwen2 decoder).

Placeholders: a 16x16 image with patch 2 gives 8x8 = 64 patches (+CLS, dropped by the "default" strategy);
pixel shuffle with downsample_ratio 0.5 turns the 8x8 grid into 4x4 -> 16 image tokens per image
(pixel_values [n_images, 3, 16, 16], one tile per image). Unlike the real processor, no <img> / </img> wrapper
tokens are inserted around the placeholders: an ("image",) segment is exactly 16 placeholder ids.
"""

from __future__ import annotations

import torch

from .tiny import Row, TinyModel, tiny_builder
from .tiny_text import (
    IMAGE_TOKEN_ID,
    build_rows,
    common_extra,
    finalize_model,
    model_dtype,
    sharpen_attention,
    text_config_kwargs,
)

IMAGE_SIZE = 16
PATCH = 2
DOWNSAMPLE = 0.5
TOKENS_PER_IMAGE = int((IMAGE_SIZE // PATCH) * DOWNSAMPLE) ** 2  # 16


@tiny_builder("internvl")
def build_internvl(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyModel:
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
        ),
        text_config=Qwen2Config(**text_config_kwargs(tie_word_embeddings=True)),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=TOKENS_PER_IMAGE,
        downsample_ratio=DOWNSAMPLE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    sharpen_attention(model.model.language_model.layers)
    model = finalize_model(model, dtype)

    def make_inputs(rows: list[Row], seed: int = 0) -> dict:
        pixels = []

        def image(gen, seg):
            pixels.append(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen))
            return torch.full((TOKENS_PER_IMAGE,), IMAGE_TOKEN_ID, dtype=torch.long)

        input_ids, attention_mask, _ = build_rows(rows, seed, {"image": image})
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixels:
            inputs["pixel_values"] = torch.stack(pixels).to(model_dtype(model))
        return inputs

    return TinyModel(
        family="internvl",
        model=model,
        make_inputs=make_inputs,
        image_token_id=IMAGE_TOKEN_ID,
        tokens_per_image=TOKENS_PER_IMAGE,
        extra=common_extra(image_size=IMAGE_SIZE),
    )
