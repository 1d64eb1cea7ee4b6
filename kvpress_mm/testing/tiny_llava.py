"""Tiny random-weight LLaVA-family models: "llava" (1.5), "llava_next" (1.6, anyres) and "llava_onevision".

Placeholder counts (all verified against the model's own feature extraction in the tests):

* llava: CLIP 16x16 image, patch 4 -> 4x4 = 16 patches (+CLS, dropped by the "default" strategy)
  -> 16 image tokens.
* llava_next: CLIP 8x8 crops, patch 4 -> 2x2 features per crop. Every image has image_sizes = (8, 8), which
  selects the (8, 8) grid pinpoint -> 1 crop + 1 base view = 2 patches per image
  (pixel_values [n_images, 2, 3, 8, 8]). Packed features: base 2x2 = 4, plus the 2x2 crop grid with one
  image_newline column -> 2x3 = 6, total 10 image tokens.
* llava_onevision: SigLIP 8x8, patch 4, "full" strategy -> same anyres layout as llava_next: 10 image tokens.
  Video: 8 frames of 8x8; each frame's 2x2 features are 2x-bilinear pooled to 1x1, plus one trailing
  image_newline per video -> 8 + 1 = 9 video tokens. `batch_num_images` is never passed, so every image uses the
  anyres path (the real processor would drop anyres for rows holding several images; we keep a constant
  tokens_per_image instead).
"""

from __future__ import annotations

import torch

from .tiny import Row, TinyModel, tiny_builder
from .tiny_text import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    build_rows,
    common_extra,
    finalize_model,
    model_dtype,
    sharpen_attention,
    text_config_kwargs,
)

VISION_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _placeholder(token_id: int, n: int) -> torch.Tensor:
    return torch.full((n,), token_id, dtype=torch.long)


def _build(config, model_cls, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    sharpen_attention(model.model.language_model.layers)
    return finalize_model(model, dtype)


# ----------------------------------------------------------------------------------------------- llava 1.5
LLAVA_IMAGE_SIZE = 16
LLAVA_PATCH = 4
LLAVA_TOKENS = (LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2  # 16 (CLS dropped)


@tiny_builder("llava")
def build_llava(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyModel:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            **VISION_COMMON, image_size=LLAVA_IMAGE_SIZE, patch_size=LLAVA_PATCH, projection_dim=32
        ),
        text_config=LlamaConfig(**text_config_kwargs(head_dim=16)),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=LLAVA_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=0,
    )
    model = _build(config, LlavaForConditionalGeneration, dtype, seed)

    def make_inputs(rows: list[Row], seed: int = 0) -> dict:
        pixels = []

        def image(gen, seg):
            pixels.append(torch.randn(3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, generator=gen))
            return _placeholder(IMAGE_TOKEN_ID, LLAVA_TOKENS)

        input_ids, attention_mask, _ = build_rows(rows, seed, {"image": image})
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixels:
            inputs["pixel_values"] = torch.stack(pixels).to(model_dtype(model))
        return inputs

    return TinyModel(
        family="llava",
        model=model,
        make_inputs=make_inputs,
        image_token_id=IMAGE_TOKEN_ID,
        tokens_per_image=LLAVA_TOKENS,
        extra=common_extra(image_size=LLAVA_IMAGE_SIZE),
    )


# ------------------------------------------------------------------------------- llava_next / onevision
ANYRES_IMAGE_SIZE = 8  # vision tower input (one crop)
ANYRES_PATCH = 4
ANYRES_GRID_PINPOINTS = [[8, 8], [8, 16], [16, 8], [16, 16]]
ANYRES_ORIGINAL_SIZE = (8, 8)  # image_sizes of every image -> (8, 8) pinpoint -> 1 crop
ANYRES_NUM_PATCHES = 2  # base view + 1 crop
_side = ANYRES_IMAGE_SIZE // ANYRES_PATCH  # 2
ANYRES_TOKENS = _side * _side + _side * (_side + 1)  # base 4 + crop grid with newline column 6 = 10
VIDEO_FRAMES = 8
_pooled = -(-_side // 2)  # ceil(side / 2) = 1
VIDEO_TOKENS = VIDEO_FRAMES * _pooled * _pooled + 1  # 9 (one image_newline per video)


def _anyres_make_inputs(model, video: bool):
    def make_inputs(rows: list[Row], seed: int = 0) -> dict:
        images, videos = [], []

        def image(gen, seg):
            images.append(torch.randn(ANYRES_NUM_PATCHES, 3, ANYRES_IMAGE_SIZE, ANYRES_IMAGE_SIZE, generator=gen))
            return _placeholder(IMAGE_TOKEN_ID, ANYRES_TOKENS)

        def vid(gen, seg):
            videos.append(torch.randn(VIDEO_FRAMES, 3, ANYRES_IMAGE_SIZE, ANYRES_IMAGE_SIZE, generator=gen))
            return _placeholder(VIDEO_TOKEN_ID, VIDEO_TOKENS)

        handlers = {"image": image, "video": vid} if video else {"image": image}
        input_ids, attention_mask, _ = build_rows(rows, seed, handlers)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        dt = model_dtype(model)
        if images:
            inputs["pixel_values"] = torch.stack(images).to(dt)
            inputs["image_sizes"] = torch.tensor([ANYRES_ORIGINAL_SIZE] * len(images), dtype=torch.long)
        if videos:
            inputs["pixel_values_videos"] = torch.stack(videos).to(dt)
        return inputs

    return make_inputs


@tiny_builder("llava_next")
def build_llava_next(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyModel:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            **VISION_COMMON, image_size=ANYRES_IMAGE_SIZE, patch_size=ANYRES_PATCH, projection_dim=32
        ),
        text_config=LlamaConfig(**text_config_kwargs(head_dim=16)),
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=ANYRES_GRID_PINPOINTS,
        image_seq_length=_side * _side,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=0,
    )
    model = _build(config, LlavaNextForConditionalGeneration, dtype, seed)
    return TinyModel(
        family="llava_next",
        model=model,
        make_inputs=_anyres_make_inputs(model, video=False),
        image_token_id=IMAGE_TOKEN_ID,
        tokens_per_image=ANYRES_TOKENS,
        extra=common_extra(
            image_size=ANYRES_IMAGE_SIZE,
            num_patches_per_image=ANYRES_NUM_PATCHES,
            image_sizes=ANYRES_ORIGINAL_SIZE,
        ),
    )


@tiny_builder("llava_onevision")
def build_llava_onevision(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyModel:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            **VISION_COMMON, image_size=ANYRES_IMAGE_SIZE, patch_size=ANYRES_PATCH, vision_use_head=False
        ),
        text_config=Qwen2Config(**text_config_kwargs()),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        image_grid_pinpoints=ANYRES_GRID_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        pad_token_id=0,
    )
    model = _build(config, LlavaOnevisionForConditionalGeneration, dtype, seed)
    return TinyModel(
        family="llava_onevision",
        model=model,
        make_inputs=_anyres_make_inputs(model, video=True),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        tokens_per_image=ANYRES_TOKENS,
        supports_video=True,
        extra=common_extra(
            image_size=ANYRES_IMAGE_SIZE,
            num_patches_per_image=ANYRES_NUM_PATCHES,
            image_sizes=ANYRES_ORIGINAL_SIZE,
            tokens_per_video=VIDEO_TOKENS,
            num_frames=VIDEO_FRAMES,
        ),
    )
