"""Switching the attention implementation of a model's text decoder only."""

from __future__ import annotations

import torch


def set_decoder_attention(model: torch.nn.Module, decoder: torch.nn.Module, name: str) -> None:
    """Set `name` as the attention implementation of `decoder` (the vision tower keeps its own)."""
    config = model.config
    if decoder.config is config:
        model.set_attn_implementation(name)
        return
    for key in config.sub_configs:
        if getattr(config, key, None) is decoder.config:
            model.set_attn_implementation({key: name})
            return
    raise ValueError(f"cannot find the text config of {type(model).__name__} among {list(config.sub_configs)}")
