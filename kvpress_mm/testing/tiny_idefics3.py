"""Tiny random-weight Idefics3 and SmolVLM models (SigLIP-like vision encoder + pixel-shuffle connector + Llama).

Image layouts in `input_ids` (what Idefics3Processor / SmolVLMProcessor emit; `<image>` = image_token_id):

* idefics3: every image is split into a 1 x 2 grid of crops plus the global image (image splitting on), i.e.
      <fake_token_around_image> <row_1_col_1> <image> x 4
      <fake_token_around_image> <row_1_col_2> <image> x 4  "\\n"
      "\\n" <fake_token_around_image> <global-img> <image> x 4 <fake_token_around_image>
  -> 3 sub-images of 16 x 16 px, 4 tokens each (16 patches of 4 px, pixel shuffle 2) = 12 tokens per image,
  in 3 separate runs of <image> tokens. "\\n" is one plain text token (NEWLINE_ID) and, as with tokenizers that do
  not merge "\\n\\n", the row end and the global-image prefix are two "\\n" tokens.
* smolvlm: no splitting (single-image prompt):
      <fake_token_around_image> <global-img> <image> x 16 <fake_token_around_image>
  -> one 32 x 32 px sub-image, 256 patches of 2 px, pixel shuffle 4 (SmolVLM's scale factor) = 16 tokens.

`pixel_values` is [B, max_sub_images, 3, S, S] (the real processor layout): rows with fewer images are padded
with all-zero images, which the model drops; `pixel_attention_mask` [B, max_sub_images, S, S] is 1 on real
images, 0 on padding images. Rows may therefore hold different numbers of images, including none.

`make_inputs` draws each row's random text ids and pixels from a generator seeded by (seed, row index), so a row
gets the same content whatever else is in the batch.
"""

from __future__ import annotations

import torch

from .tiny import Row, TinyModel, left_pad, tiny_builder

VOCAB = 600
TEXT_ID_HIGH = 500  # random text ids are drawn from [0, TEXT_ID_HIGH); every special id is >= TEXT_ID_HIGH
BOS_ID = 500  # <|begin_of_text|>
EOS_ID = 501  # <end_of_utterance>
PAD_ID = 502
FAKE_ID = 503  # <fake_token_around_image>
IMAGE_ID = 504  # <image>
GLOBAL_IMG_ID = 505  # <global-img>
NEWLINE_ID = 506  # "\n" (a plain text token, kept out of the random text range)
ROW_COL_BASE = 507  # <row_{i+1}_col_{j+1}> = ROW_COL_BASE + 6 * i + j, i, j < 6


def row_col_token_id(i: int, j: int) -> int:
    return ROW_COL_BASE + 6 * i + j


# per family: sub-image size, patch size, pixel-shuffle scale factor, split grid (rows, cols) or (0, 0)
_SPECS = {
    "idefics3": dict(image_size=16, patch_size=4, scale_factor=2, grid=(1, 2)),
    "smolvlm": dict(image_size=32, patch_size=2, scale_factor=4, grid=(0, 0)),
}


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


def _image_ids(seq_len: int, grid: tuple[int, int]) -> list[int]:
    """Token ids of one image, as Idefics3Processor.replace_image_token / SmolVLM get_image_prompt_string."""
    rows, cols = grid
    ids: list[int] = []
    if rows == 0 and cols == 0:
        return [FAKE_ID, GLOBAL_IMG_ID] + [IMAGE_ID] * seq_len + [FAKE_ID]
    for i in range(rows):
        for j in range(cols):
            ids += [FAKE_ID, row_col_token_id(i, j)] + [IMAGE_ID] * seq_len
        ids += [NEWLINE_ID]
    ids += [NEWLINE_ID, FAKE_ID, GLOBAL_IMG_ID] + [IMAGE_ID] * seq_len + [FAKE_ID]
    return ids


def _build(family: str, dtype: torch.dtype, seed: int) -> TinyModel:
    import transformers

    spec = _SPECS[family]
    size, patch, scale, grid = spec["image_size"], spec["patch_size"], spec["scale_factor"], spec["grid"]
    seq_len = (size // patch) ** 2 // scale**2
    subs_per_image = grid[0] * grid[1] + 1
    tokens_per_image = seq_len * subs_per_image

    cfg_cls, model_cls = {
        "idefics3": (transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration),
        "smolvlm": (transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration),
    }[family]
    config = cfg_cls(
        text_config=dict(
            model_type="llama",
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_channels=3,
            image_size=size,
            patch_size=patch,
        ),
        image_token_id=IMAGE_ID,
        scale_factor=scale,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="sdpa")
    assert model.model.image_seq_len == seq_len, (model.model.image_seq_len, seq_len)
    model = _cast(model.eval(), dtype)

    def make_inputs(rows: list[Row], seed: int = 0) -> dict:
        ids_rows, row_pixels = [], []
        for r, row in enumerate(rows):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
            ids: list[int] = []
            pixels: list[torch.Tensor] = []
            for seg in row:
                kind = seg[0]
                if kind == "text":
                    ids += torch.randint(0, TEXT_ID_HIGH, (int(seg[1]),), generator=gen).tolist()
                elif kind == "image":
                    ids += _image_ids(seq_len, grid)
                    # crops in row-major order, then the global image (Idefics3ImageProcessor.split_images)
                    pixels += [torch.randn(3, size, size, generator=gen) for _ in range(subs_per_image)]
                else:
                    raise ValueError(f"{family}: unsupported segment {seg!r}")
            ids_rows.append(torch.tensor(ids, dtype=torch.long))
            row_pixels.append(pixels)
        input_ids, attention_mask = left_pad(ids_rows, PAD_ID)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        n_max = max(len(p) for p in row_pixels)
        if n_max:
            pixel_values = torch.zeros(len(rows), n_max, 3, size, size)
            pixel_attention_mask = torch.zeros(len(rows), n_max, size, size, dtype=torch.long)
            for r, pixels in enumerate(row_pixels):
                if pixels:
                    pixel_values[r, : len(pixels)] = torch.stack(pixels)
                    pixel_attention_mask[r, : len(pixels)] = 1
            out["pixel_values"] = pixel_values.to(dtype)
            out["pixel_attention_mask"] = pixel_attention_mask
        return out

    return TinyModel(
        family=family,
        model=model,
        make_inputs=make_inputs,
        image_token_id=IMAGE_ID,
        video_token_id=None,
        tokens_per_image=tokens_per_image,
        supports_video=False,
        per_row_pixels=("pixel_values", "pixel_attention_mask"),
        extra={
            "pad_token_id": PAD_ID,
            "eos_token_id": EOS_ID,
            "bos_token_id": BOS_ID,
            "fake_image_token_id": FAKE_ID,
            "global_image_token_id": GLOBAL_IMG_ID,
            "newline_token_id": NEWLINE_ID,
            "row_col_token_ids": [row_col_token_id(i, j) for i in range(6) for j in range(6)],
            "text_id_range": (0, TEXT_ID_HIGH),
            "image_seq_len": seq_len,
            "sub_images_per_image": subs_per_image,
            "split_grid": grid,
            "note": (
                f"each image = {subs_per_image} sub-image(s) of {seq_len} <image> tokens "
                + ("(1x2 crops with <row_i_col_j> markers + global image)" if grid != (0, 0) else "(global image only)")
                + "; rows may have different numbers of images (zero-padded pixel_values)."
            ),
        },
    )


@tiny_builder("idefics3")
def build_idefics3(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyModel:
    return _build("idefics3", dtype, seed)


@tiny_builder("smolvlm")
def build_smolvlm(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyModel:
    return _build("smolvlm", dtype, seed)
