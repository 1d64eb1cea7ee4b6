"""ModelBundle: a model plus how to turn samples into its inputs and its output ids into text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype, allow_auto: bool = False):
    """torch dtype from a dtype or its name ("float32", "bf16", ...); "auto" passes through when allowed."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key == "auto" and allow_auto:
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
    allowed = sorted(_DTYPES) + (["auto"] if allow_auto else [])
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or one of {', '.join(allowed)}")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the model's `device` (first parameter's device for device_map-sharded models)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


@dataclass
class ModelBundle:
    """name: what load_model was called with; prepare(samples) -> left-padded inputs on the model's device
    for `model.generate(**inputs)`; decode(ids) -> texts of the rows of `ids` (new tokens only);
    trained: whether the answers are meaningful (a trained language model); notes: caveats for reports.
    generate_kwargs: extra keyword arguments for `generate` (e.g. pad / eos ids); info: details for reports.
    encode(text) -> the token ids of `text` as the model would emit it (for teacher-forced gold answers;
    None: the bundle cannot, and gold-answer metrics are skipped)."""

    name: str
    model: torch.nn.Module
    prepare: Callable[[list], dict]
    decode: Callable[[Any], list[str]]
    trained: bool
    notes: str = ""
    generate_kwargs: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    encode: Callable[[str], list[int]] | None = None

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.model)


def to_device(inputs: dict, device: torch.device, float_dtype: torch.dtype | None = None) -> dict:
    """Move every tensor to `device`; floating tensors (pixels) also to `float_dtype` when given."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            if float_dtype is not None and v.is_floating_point():
                v = v.to(device=device, dtype=float_dtype)
            else:
                v = v.to(device)
        out[k] = v
    return out
