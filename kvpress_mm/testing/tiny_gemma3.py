"""Tiny random-weight Gemma3 (SigLIP vision tower + Gemma3 text model with sliding-window and global layers).

Layout of one image in `input_ids` (what Gemma3Processor's `full_image_sequence` emits):
    "\\n\\n" <start_of_image> <image_soft_token> x tokens_per_image <end_of_image> "\\n\\n"
"\\n\\n" is one ordinary text token (NEWLINES_ID). `token_type_ids` is 1 on the <image_soft_token> ids only
(it drives Gemma3's bidirectional attention inside each image block).

Sizes: SigLIP image 24 x 24 px, patch 4 -> 6 x 6 patches, average-pooled 2 x 2 -> 3 x 3 = 9 tokens per image.
Text: 4 layers, layer_types = sliding, sliding, full, sliding; sliding_window = 8 (smaller than one image block
plus its markers, so sliding layers really drop context).

`make_inputs` draws each row's random text ids and pixels from a generator seeded by (seed, row index), so a row
gets the same content whatever else is in the batch. No <bos> is added (rows are exactly their segments).
"""

from __future__ import annotations

import torch

from .tiny import Row, TinyModel, left_pad, tiny_builder

VOCAB = 512
PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
TEXT_ID_LOW = 3  # random text ids are drawn from [TEXT_ID_LOW, TEXT_ID_HIGH)
TEXT_ID_HIGH = 500
BOI_ID = 500  # <start_of_image>
EOI_ID = 501  # <end_of_image>
IMAGE_ID = 502  # <image_soft_token>
NEWLINES_ID = 503  # "\n\n" (a plain text token, kept out of the random text range)

IMAGE_SIZE = 24
PATCH = 4
TOKENS_PER_IMAGE = 9  # (24 / 4) ** 2 = 36 patches, pooled to 3 x 3
SLIDING_WINDOW = 8
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


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


@tiny_builder("gemma3")
def build_gemma3(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyModel:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(
            model_type="gemma3_text",
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=len(LAYER_TYPES),
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            max_position_embeddings=4096,
            sliding_window=SLIDING_WINDOW,
            layer_types=list(LAYER_TYPES),
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            bos_token_id=BOS_ID,
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_channels=3,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            vision_use_head=False,
        ),
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
        image_token_index=IMAGE_ID,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    # Gemma3 zero-initialises the vision->text projection, which would make every image embed to 0 and hide
    # vision-path bugs: give it random weights instead.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.copy_(torch.randn(proj.shape, generator=gen) * 0.05)
    model = _cast(model.eval(), dtype)

    def make_inputs(rows: list[Row], seed: int = 0) -> dict:
        ids_rows, type_rows, pixels = [], [], []
        for r, row in enumerate(rows):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
            ids: list[int] = []
            types: list[int] = []
            for seg in row:
                kind = seg[0]
                if kind == "text":
                    n = int(seg[1])
                    ids += torch.randint(TEXT_ID_LOW, TEXT_ID_HIGH, (n,), generator=gen).tolist()
                    types += [0] * n
                elif kind == "image":
                    ids += [NEWLINES_ID, BOI_ID] + [IMAGE_ID] * TOKENS_PER_IMAGE + [EOI_ID, NEWLINES_ID]
                    types += [0, 0] + [1] * TOKENS_PER_IMAGE + [0, 0]
                    pixels.append(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen))
                else:
                    raise ValueError(f"gemma3: unsupported segment {seg!r}")
            ids_rows.append(torch.tensor(ids, dtype=torch.long))
            type_rows.append(torch.tensor(types, dtype=torch.long))
        input_ids, attention_mask = left_pad(ids_rows, PAD_ID)
        token_type_ids, _ = left_pad(type_rows, 0)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if pixels:
            out["pixel_values"] = torch.stack(pixels).to(dtype)
        return out

    return TinyModel(
        family="gemma3",
        model=model,
        make_inputs=make_inputs,
        image_token_id=IMAGE_ID,
        video_token_id=None,
        tokens_per_image=TOKENS_PER_IMAGE,
        supports_video=False,
        extra={
            "pad_token_id": PAD_ID,
            "eos_token_id": EOS_ID,
            "bos_token_id": BOS_ID,
            "boi_token_id": BOI_ID,
            "eoi_token_id": EOI_ID,
            "newlines_token_id": NEWLINES_ID,
            "text_id_range": (TEXT_ID_LOW, TEXT_ID_HIGH),
            "sliding_window": SLIDING_WINDOW,
            "layer_types": list(LAYER_TYPES),
            "note": 'image = "\\n\\n" <boi> 9 x <image> <eoi> "\\n\\n"; token_type_ids = 1 on <image> ids '
            "(bidirectional attention inside each image block).",
        },
    )
