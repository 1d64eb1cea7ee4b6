"""Registry of tiny random-weight model builders (one module per model family).

A builder returns a `TinyModel`: the model (eval mode, sdpa attention, fp32 unless asked otherwise)
and `make_inputs(rows)`, which turns a batch description into left-padded model inputs.

A row is a list of segments, each a tuple:
    ("text", n)   n random text tokens (never a special / placeholder id)
    ("image",)    one image, expanded to the family's placeholder tokens, with its pixels
    ("video",)    one video (only families with video support)
e.g. rows = [[("text", 5), ("image",), ("text", 7)], [("image",), ("text", 3)]]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..registry_base import Registry

Row = list[tuple]

# family name -> builder(dtype=, seed=) -> TinyModel; every module of kvpress_mm.testing is imported on first
# use and registers its families with @tiny_builder, so a new family is a new module there
BUILDERS: Registry[Callable[..., TinyModel]] = Registry(
    "tiny model family",
    listing="known",
    builtins="kvpress_mm.testing",
    # a re-imported module (same qualified name) replaces its builder
    same=lambda old, new: old is new or (old.__module__, old.__qualname__) == (new.__module__, new.__qualname__),
)


def tiny_families() -> tuple[str, ...]:
    """The families build_tiny knows, sorted (also the module constant TINY_FAMILIES)."""
    return tuple(BUILDERS.names())


def __getattr__(name: str):
    # TINY_FAMILIES is computed on first use, after the builder modules were discovered (they import this one)
    if name == "TINY_FAMILIES":
        return tiny_families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class TinyModel:
    family: str
    model: torch.nn.Module
    # make_inputs(rows, seed=0) -> dict of tensors accepted by model(**inputs) and model.generate(**inputs)
    make_inputs: Callable[..., dict]
    image_token_id: int | None = None
    video_token_id: int | None = None
    tokens_per_image: int = 0
    supports_video: bool = False
    # the make_inputs keys whose tensors are per row ([B, most images of a row, ...], padded with all-zero
    # images) instead of per image ([images, ...]): batches are merged by padding these (Idefics3, SmolVLM)
    per_row_pixels: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


def tiny_builder(family: str):
    """Class-free registration decorator used by the family modules."""

    def register(fn):
        BUILDERS.register(family, fn)
        return fn

    return register


def build_tiny(
    family: str, dtype: torch.dtype = torch.float32, seed: int = 0, device: str | torch.device = "cpu"
) -> TinyModel:
    """Build the tiny random-weight model of `family` (see TINY_FAMILIES) on `device`.

    Weights and inputs are drawn on the CPU (the same numbers on every device), then moved."""
    builder = BUILDERS.get(family)  # ValueError: unknown tiny model family 'x'; known: ...
    tiny = builder(dtype=dtype, seed=seed)
    device = torch.device(device)
    if device.type != "cpu":
        tiny.model.to(device)
        tiny.make_inputs = _inputs_on(tiny.make_inputs, device)
    return tiny


def _inputs_on(make_inputs: Callable[..., dict], device: torch.device) -> Callable[..., dict]:
    def on_device(*args, **kwargs) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in make_inputs(*args, **kwargs).items()}

    return on_device


def left_pad(rows_ids: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors into a left-padded batch and its attention mask."""
    width = max(len(r) for r in rows_ids)
    ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for i, r in enumerate(rows_ids):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask
