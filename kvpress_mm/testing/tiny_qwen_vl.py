"""Tiny random-weight Qwen2-VL and Qwen2.5-VL models (images and videos).

Layout of one image in `input_ids` (as the real processor/chat template emits it):
    <|vision_start|> <|image_pad|> x tokens_per_image <|vision_end|>
and of one video:
    <|vision_start|> <|video_pad|> x tokens_per_video <|vision_end|>

Sizes: patch 4 px, temporal patch 2, spatial merge 2.
  image: 16 x 32 px -> grid_thw (1, 4, 8) -> 32 patches -> 8 placeholder tokens (2 x 4 after the 2x2 merge)
  video: 4 frames of 16 x 16 px -> grid_thw (2, 4, 4) -> 32 patches -> 8 placeholder tokens (2 x 2 x 2)
The images are non-square on purpose so the M-RoPE height/width positions differ.

`make_inputs` draws each row's random text ids and pixels from a generator seeded by (seed, row index), so a row
gets the same content whatever else is in the batch (row i of a batch == that row alone, up to padding).
It returns input_ids, attention_mask, mm_token_type_ids (0 text, 1 image, 2 video) and, when present,
pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw (+ second_per_grid_ts for Qwen2.5-VL).
Pixel tensors are in the model dtype (like `processor(...).to(model.dtype)`).
"""

from __future__ import annotations

import torch

from .tiny import Row, TinyModel, left_pad, tiny_builder

VOCAB = 512
TEXT_ID_HIGH = 500  # random text ids are drawn from [0, TEXT_ID_HIGH); every special id is >= TEXT_ID_HIGH
PAD_ID = 500  # <|endoftext|> (Qwen uses it as pad and bos)
BOS_ID = 500
EOS_ID = 501  # <|im_end|>
VISION_START_ID = 502
VISION_END_ID = 503
IMAGE_ID = 504  # <|image_pad|>
VIDEO_ID = 505  # <|video_pad|>

PATCH = 4
TEMPORAL_PATCH = 2
MERGE = 2
CHANNELS = 3
IMAGE_GRID = (1, 4, 8)  # (t, h, w) in patches
VIDEO_GRID = (2, 4, 4)
TOKENS_PER_SECOND = 2  # Qwen2.5-VL temporal position spacing
SECOND_PER_GRID_T = 1.0  # Qwen2.5-VL processor: temporal_patch_size / fps, fps = 2

HIDDEN = 64
NUM_LAYERS = 3
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN // NUM_HEADS  # 16: Qwen2-VL text config has no head_dim field
MROPE_SECTION = [2, 3, 3]  # (t, h, w) rotary frequency split; must sum to HEAD_DIM // 2


def _grid_tokens(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // (MERGE * MERGE)


TOKENS_PER_IMAGE = _grid_tokens(IMAGE_GRID)  # 8
TOKENS_PER_VIDEO = _grid_tokens(VIDEO_GRID)  # 8


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast weights (and floating buffers) to dtype, keeping rotary inv_freq buffers in fp32 like from_pretrained."""
    if dtype == torch.float32:
        return model
    kept = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model.to(dtype)
    for name, buf in kept.items():
        mod_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod_name) if mod_name else model, attr, buf)
    return model


def _text_config() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(MROPE_SECTION)},
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def _make_inputs_fn(family: str, dtype: torch.dtype):
    patch_dim = CHANNELS * TEMPORAL_PATCH * PATCH * PATCH

    def make_inputs(rows: list[Row], seed: int = 0) -> dict:
        ids_rows, type_rows = [], []
        pixels, grids, vpixels, vgrids = [], [], [], []
        for r, row in enumerate(rows):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
            ids: list[int] = []
            types: list[int] = []
            for seg in row:
                kind = seg[0]
                if kind == "text":
                    n = int(seg[1])
                    ids += torch.randint(0, TEXT_ID_HIGH, (n,), generator=gen).tolist()
                    types += [0] * n
                elif kind in ("image", "video"):
                    is_img = kind == "image"
                    grid = IMAGE_GRID if is_img else VIDEO_GRID
                    n_tok = _grid_tokens(grid)
                    ids += [VISION_START_ID] + [IMAGE_ID if is_img else VIDEO_ID] * n_tok + [VISION_END_ID]
                    types += [0] + [1 if is_img else 2] * n_tok + [0]
                    # processor layout: one row per patch, C * temporal_patch * patch * patch values
                    pix = torch.randn(grid[0] * grid[1] * grid[2], patch_dim, generator=gen)
                    (pixels if is_img else vpixels).append(pix)
                    (grids if is_img else vgrids).append(list(grid))
                else:
                    raise ValueError(f"{family}: unknown segment {seg!r}")
            ids_rows.append(torch.tensor(ids, dtype=torch.long))
            type_rows.append(torch.tensor(types, dtype=torch.long))
        input_ids, attention_mask = left_pad(ids_rows, PAD_ID)
        mm_token_type_ids, _ = left_pad(type_rows, 0)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}
        if pixels:
            out["pixel_values"] = torch.cat(pixels).to(dtype)
            out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        if vpixels:
            out["pixel_values_videos"] = torch.cat(vpixels).to(dtype)
            out["video_grid_thw"] = torch.tensor(vgrids, dtype=torch.long)
            if family == "qwen2_5_vl":
                out["second_per_grid_ts"] = torch.tensor([SECOND_PER_GRID_T] * len(vgrids))
        return out

    return make_inputs


def _finish(family: str, model, dtype: torch.dtype) -> TinyModel:
    model = _cast(model.eval(), dtype)
    return TinyModel(
        family=family,
        model=model,
        make_inputs=_make_inputs_fn(family, dtype),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        tokens_per_image=TOKENS_PER_IMAGE,
        supports_video=True,
        extra={
            "tokens_per_video": TOKENS_PER_VIDEO,
            "pad_token_id": PAD_ID,
            "eos_token_id": EOS_ID,
            "vision_start_token_id": VISION_START_ID,
            "vision_end_token_id": VISION_END_ID,
            "text_id_range": (0, TEXT_ID_HIGH),
            "image_grid_thw": IMAGE_GRID,
            "video_grid_thw": VIDEO_GRID,
            "note": "image/video = <vision_start> + pad tokens + <vision_end>; M-RoPE positions come from "
            "mm_token_type_ids + grids (rope_deltas cached on model.model).",
        },
    )


@tiny_builder("qwen2_vl")
def build_qwen2_vl(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyModel:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=_text_config(),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=HIDDEN,  # output dim of the patch merger = text hidden size
            mlp_ratio=2,
            num_heads=2,
            in_channels=CHANNELS,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL_PATCH,
        ),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return _finish("qwen2_vl", model, dtype)


@tiny_builder("qwen2_5_vl")
def build_qwen2_5_vl(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyModel:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=_text_config(),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=HIDDEN,
            num_heads=2,
            in_channels=CHANNELS,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL_PATCH,
            tokens_per_second=TOKENS_PER_SECOND,
            # window of 16 px = 2x2 merged tokens: the 2x4 merged image grid is split into 2 windows
            window_size=16,
            fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return _finish("qwen2_5_vl", model, dtype)
