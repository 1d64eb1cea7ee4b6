"""`mini_llava`: the offline real model (SmolLM2-135M-Instruct + DINOv2-S/14, see kvpress_mm.offline)."""

from __future__ import annotations

from .bundle import ModelBundle, model_device, model_dtype, resolve_dtype, to_device

NOTES_UNTRAINED = (
    "mini_llava = SmolLM2-135M-Instruct (real, trained) + DINOv2-S/14 (real) joined by an UNTRAINED projector: "
    "image tokens carry real visual features but no meaning for the language model, so scores measure how "
    "compression treats text in the presence of (meaningless) image tokens, not visual understanding. "
    "256 tokens per image."
)
NOTES_PROJECTOR = (
    "mini_llava = SmolLM2-135M-Instruct + DINOv2-S/14 with the projector loaded from {path} "
    "(trained by this project, not a released VLM). 256 tokens per image."
)


def load_mini_llava_bundle(
    dtype="float32", device="cpu", projector_path=None, cache_dir=None, attn_implementation: str = "sdpa"
) -> ModelBundle:
    from kvpress_mm.offline import paths
    from kvpress_mm.offline.mini_llava import load_mini_llava

    dtype = resolve_dtype(dtype)
    model, processor = load_mini_llava(
        dtype=dtype,
        device=device,
        cache_dir=cache_dir,
        projector_path=projector_path,
        attn_implementation=attn_implementation,
    )

    def prepare(samples) -> dict:
        inputs = processor.prepare_inputs([list(s.content) for s in samples])
        return to_device(inputs, model_device(model), model_dtype(model))

    def decode(ids) -> list[str]:
        return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]

    projector = projector_path or (paths.SHIPPED_PROJECTOR if paths.SHIPPED_PROJECTOR.is_file() else None)
    notes = NOTES_UNTRAINED if projector is None else NOTES_PROJECTOR.format(path=projector)
    tok = processor.tokenizer
    return ModelBundle(
        name="mini_llava",
        model=model,
        prepare=prepare,
        decode=decode,
        encode=lambda text: tok(text, add_special_tokens=False)["input_ids"],
        trained=True,  # the language model is; see notes for the projector
        notes=notes,
        generate_kwargs={"pad_token_id": processor.pad_token_id},
        info={
            "tokens_per_image": processor.tokens_per_image,
            "projector": str(projector) if projector else "untrained (seeded init)",
            "eos_token_id": tok.eos_token_id,
            "dtype": str(dtype).removeprefix("torch."),
        },
    )
