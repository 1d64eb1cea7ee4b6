"""`tiny_<family>`: the random-weight test models of kvpress_mm.testing, with a pseudo-tokenizer.

Tiny models have no tokenizer. Text becomes deterministic pseudo-token ids: each whitespace-separated word is
hashed (crc32) into the family's ordinary text id range, so the same text always gives the same ids. Every
image becomes the family's image segment (placeholder tokens, markers) with random pixels seeded by the
sample id and the image's index (the PIL image itself is not used: tiny vision towers take tiny random
inputs); the text-only families (llama, qwen2) drop the images. Rows are built one by one and then
left-padded together, so a sample's inputs do not depend on which other samples share its batch.
`decode` writes ids as "<id>" words.
"""

from __future__ import annotations

import re
import zlib

import torch

from .bundle import ModelBundle, model_device, resolve_dtype, to_device

_WORD = re.compile(r"\S+")


def text_ids(text: str, id_range: tuple[int, int]) -> list[int]:
    low, high = id_range
    return [low + zlib.crc32(w.encode()) % (high - low) for w in _WORD.findall(text)]


def _stable_seed(key: str) -> int:
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def _left_pad(tensors: list[torch.Tensor], value) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        pad = torch.full((t.shape[0], width - t.shape[1], *t.shape[2:]), value, dtype=t.dtype)
        out.append(torch.cat([pad, t], 1))
    return torch.cat(out, 0)


def _pad_dim1(tensors: list[torch.Tensor | None], template: torch.Tensor) -> torch.Tensor:
    """[1, n_i, ...] per row (None: a row without images) -> [B, max n_i, ...], zero-filled."""
    width = max(t.shape[1] for t in tensors if t is not None)
    rows = []
    for t in tensors:
        row = torch.zeros((1, width, *template.shape[2:]), dtype=template.dtype)
        if t is not None:
            row[:, : t.shape[1]] = t
        rows.append(row)
    return torch.cat(rows, 0)


def merge_rows(rows: list[dict], pad_id: int, per_row: tuple[str, ...] = ()) -> dict:
    """Left-pad single-row inputs of one tiny family into one batch, in the layout make_inputs(rows) gives.

    per_row: the keys whose tensors are per row ([B, most images of a row, ...]; TinyModel.per_row_pixels),
    zero-padded to the widest row; the other non-sequence tensors are per image, concatenated."""
    seq_keys = [
        k
        for k, v in rows[0].items()
        if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == rows[0]["input_ids"].shape
    ]
    out = {}
    for key in seq_keys:
        out[key] = _left_pad([r[key] for r in rows], pad_id if key == "input_ids" else 0)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in seq_keys and k not in keys]
    for key in keys:
        present = [r.get(key) for r in rows]
        if key in per_row:
            template = next(t for t in present if t is not None)
            out[key] = _pad_dim1(present, template)
        else:
            out[key] = torch.cat([t for t in present if t is not None], 0)
    return out


def load_tiny_bundle(family: str, dtype="float32", device="cpu", seed: int = 0) -> ModelBundle:
    from kvpress_mm.testing import build_tiny

    tiny = build_tiny(family, dtype=resolve_dtype(dtype), seed=seed)
    model = tiny.model.to(device)
    id_range = tuple(tiny.extra["text_id_range"])
    pad_id = int(tiny.extra["pad_token_id"])
    multimodal = tiny.image_token_id is not None  # text-only families (llama, qwen2) drop the images

    def sample_inputs(sample) -> dict:
        segments, ids = [], []
        for part in sample.content:
            if isinstance(part, str):
                words = text_ids(part, id_range)
                if words:
                    segments.append(("text", len(words)))
                    ids += words
            elif multimodal:
                segments.append(("image",))
        if not segments:
            raise ValueError(f"sample {sample.id!r} has no content")
        inputs = tiny.make_inputs([segments], seed=_stable_seed(sample.id))
        row = inputs["input_ids"][0]
        text_pos = ((row >= id_range[0]) & (row < id_range[1])).nonzero().flatten()
        if len(text_pos) != len(ids):  # a family whose markers fall in the text range would break this
            raise RuntimeError(f"tiny_{family}: {len(text_pos)} text positions for {len(ids)} text tokens")
        row[text_pos] = torch.tensor(ids, dtype=row.dtype)
        return inputs

    def prepare(samples) -> dict:
        batch = merge_rows([sample_inputs(s) for s in samples], pad_id, tiny.per_row_pixels)
        return to_device(batch, model_device(model))

    def decode(ids) -> list[str]:
        return [" ".join(f"<{int(i)}>" for i in row) for row in ids]

    return ModelBundle(
        name=f"tiny_{family}",
        model=model,
        prepare=prepare,
        decode=decode,
        encode=lambda text: text_ids(text, id_range),
        trained=False,
        notes=(
            f"tiny_{family}: random weights (kvpress_mm.testing), pseudo-tokens from hashed words, "
            + ("random pixels" if multimodal else "text only (images are dropped)")
            + "; only the fidelity task is meaningful."
        ),
        generate_kwargs={"pad_token_id": pad_id},
        info={"family": family, "tokens_per_image": tiny.tokens_per_image, "text_id_range": list(id_range)},
    )
