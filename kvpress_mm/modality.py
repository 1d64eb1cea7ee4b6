"""Per-position modality labels of a prompt (text, image, video, padding)."""

from __future__ import annotations

from enum import IntEnum

import torch


class Modality(IntEnum):
    TEXT = 0
    IMAGE = 1
    VIDEO = 2
    PAD = 3


def modality_from_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_ids: tuple[int, ...] = (),
    video_token_ids: tuple[int, ...] = (),
) -> torch.Tensor:
    """Label every position of a [batch, seq] prompt from its token ids and padding mask.

    Placeholder tokens that the model replaces by vision features are IMAGE / VIDEO; marker tokens
    around them (vision_start, boi, ...) are ordinary text. Padding (attention_mask == 0) is PAD.
    """
    labels = torch.full(input_ids.shape, int(Modality.TEXT), dtype=torch.int8, device=input_ids.device)
    for ids, label in ((image_token_ids, Modality.IMAGE), (video_token_ids, Modality.VIDEO)):
        if ids:
            hits = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
            labels[hits] = int(label)
    if attention_mask is not None:
        labels[attention_mask.to(input_ids.device) == 0] = int(Modality.PAD)
    check_left_padded(labels)
    return labels


def modality_from_type_ids(mm_token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Labels from Qwen-VL style `mm_token_type_ids` (0 text, 1 image, 2 video)."""
    labels = mm_token_type_ids.to(torch.int8).clone()
    if attention_mask is not None:
        labels[attention_mask.to(labels.device) == 0] = int(Modality.PAD)
    check_left_padded(labels)
    return labels


def check_left_padded(labels: torch.Tensor) -> None:
    """Compression keeps masks aligned only for left padding (what generate() needs anyway)."""
    valid = labels != int(Modality.PAD)
    # a padding slot after a real token means right (or interior) padding
    seen_real = valid.cumsum(dim=-1) > 0
    if bool((seen_real & ~valid).any()):
        raise ValueError(
            "kvpress-mm needs left-padded batches (padding before the prompt), got padding after real tokens; "
            "set tokenizer.padding_side = 'left'"
        )
