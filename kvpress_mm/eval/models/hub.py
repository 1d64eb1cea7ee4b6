"""`hub`: any transformers image-text-to-text model (or text LM) from the hub or a local folder.

Image-text models load with AutoModelForImageTextToText + AutoProcessor and are prompted through the
processor's chat template (one user turn; text and images as {"type": "text"} / {"type": "image"} parts, in
the sample's order); text LMs load with AutoModelForCausalLM + AutoTokenizer (samples must be text only).
Batches are left-padded. Needs a reachable hub or a local path (HF_HUB_OFFLINE=1 allows cached / local only).
"""

from __future__ import annotations

import os

from .bundle import ModelBundle, model_device, model_dtype, resolve_dtype, to_device


def _unreachable(model_id: str, err: Exception) -> OSError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0")
    return OSError(
        f"hub model {model_id!r} could not be loaded: it is neither a local folder nor in the local cache, and "
        f"the hub is unreachable or does not have it (HF_HUB_OFFLINE={offline}). Pass model_id=<a local "
        f"folder with config.json> to run offline, or use load_model('mini_llava'). ({type(err).__name__}: {err})"
    )


def _conversation(sample, text_only: bool) -> list[dict]:
    if text_only:
        if sample.images:
            raise ValueError(f"sample {sample.id!r} has images but the hub model is text-only")
        return [{"role": "user", "content": "\n".join(sample.texts)}]
    parts = [
        {"type": "text", "text": c} if isinstance(c, str) else {"type": "image", "image": c} for c in sample.content
    ]
    return [{"role": "user", "content": parts}]


def load_hub_bundle(
    model_id: str | None = None,
    dtype="auto",
    device_map=None,
    device=None,
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    trust_remote_code: bool = False,
    processor_kwargs: dict | None = None,
) -> ModelBundle:
    """model_id: hub id or local folder; dtype: "auto" / "bfloat16" / torch dtype; device_map: as in
    from_pretrained (e.g. "auto"); device: move the model there when no device_map is given."""
    if not model_id:
        raise ValueError("load_model('hub', model_id=...) needs model_id (a hub id or a local folder)")
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if os.path.isdir(model_id) and not os.path.isfile(os.path.join(model_id, "config.json")):
        raise FileNotFoundError(f"hub model {model_id!r} could not be loaded: the folder has no config.json")
    common = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(model_id, **common)
    except OSError as err:
        raise _unreachable(model_id, err) from err
    except ValueError as err:  # found, but not a model this transformers version knows
        raise ValueError(f"hub model {model_id!r}: {err}") from err

    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        model_cls, text_only = AutoModelForImageTextToText, False
    elif config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        model_cls, text_only = AutoModelForCausalLM, True
    else:
        raise ValueError(
            f"{model_id!r} (model_type {config.model_type!r}) is neither an image-text-to-text model "
            "nor a causal LM in this transformers version"
        )
    try:
        if text_only:
            processor = AutoTokenizer.from_pretrained(model_id, **common)
            tokenizer = processor
        else:
            processor = AutoProcessor.from_pretrained(model_id, **common, **(processor_kwargs or {}))
            tokenizer = processor.tokenizer
        model = model_cls.from_pretrained(
            model_id,
            dtype=resolve_dtype(dtype, allow_auto=True),
            device_map=device_map,
            attn_implementation=attn_implementation,
            **common,
        )
    except OSError as err:
        raise _unreachable(model_id, err) from err
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(processor, "chat_template", None) is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{model_id!r} has no chat template; the evaluation prompts are chat conversations")

    def prepare(samples) -> dict:
        conversations = [_conversation(s, text_only) for s in samples]
        common = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
        if text_only:
            inputs = processor.apply_chat_template(conversations, padding=True, **common)
        else:  # processors take the __call__ options (padding) in processor_kwargs since transformers 5
            inputs = processor.apply_chat_template(conversations, processor_kwargs={"padding": True}, **common)
        return to_device(dict(inputs), model_device(model), model_dtype(model))

    def decode(ids) -> list[str]:
        return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]

    return ModelBundle(
        name=f"hub:{model_id}",
        model=model,
        prepare=prepare,
        decode=decode,
        encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        trained=True,
        notes=f"{model_id} ({type(model).__name__}) prompted through its chat template.",
        generate_kwargs={"pad_token_id": tokenizer.pad_token_id},
        info={
            "model_id": model_id,
            "class": type(model).__name__,
            "text_only": text_only,
            "dtype": str(model_dtype(model)).removeprefix("torch."),
        },
    )
