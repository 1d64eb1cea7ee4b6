"""Models the benchmark runs on: random Llama decoders of two sizes, and mini_llava when installed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# name -> (hidden, layers, heads, kv_heads, intermediate)
RANDOM_SIZES = {
    "micro": (64, 2, 4, 2, 128),  # for smoke tests of the benchmark itself
    "tiny": (256, 4, 4, 4, 704),
    "mid": (1024, 8, 16, 16, 2816),
    # many narrow layers: the framework's per-layer cost shows beside a small model cost (mode=overhead)
    "narrow": (64, 32, 4, 2, 128),
}


@dataclass
class BenchModel:
    name: str
    model: torch.nn.Module
    make_inputs: Callable[..., dict]  # (prompt length, batch, padding) -> model inputs
    config: object  # the text config (for DynamicCache)


def random_llama(
    name: str, device: torch.device, dtype: torch.dtype, seed: int = 0, layers: int | None = None
) -> BenchModel:
    """layers: this many decoder layers instead of the size's own (the same shape otherwise)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, size_layers, heads, kv_heads, intermediate = RANDOM_SIZES[name]
    layers = size_layers if layers is None else layers
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32768,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    gen = torch.Generator().manual_seed(seed)

    def make_inputs(length: int, batch: int = 1, padding: float = 0.0) -> dict:
        """Row i of a batch > 1 is left-padded by padding * length * i / (batch - 1) positions."""
        ids = torch.randint(3, config.vocab_size, (batch, length), generator=gen)
        if padding == 0:
            return {"input_ids": ids.to(device)}
        mask = torch.ones((batch, length), dtype=torch.long)
        for row in range(1, batch):
            mask[row, : round(padding * length * row / (batch - 1))] = 0
        ids.masked_fill_(mask == 0, 0)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    return BenchModel(name, model, make_inputs, config)


def mini_llava(device: torch.device, dtype: torch.dtype, images: int = 4) -> BenchModel:
    """The offline real VLM; prompts hold `images` real-feature images (256 tokens each) + filler text."""
    from kvpress_mm.offline import load_mini_llava
    from kvpress_mm.offline.images import synthetic_image

    model, processor = load_mini_llava(dtype=dtype, device=device)
    words = "the of river light museum quiet morning garden number seven paper window".split()

    def make_inputs(length: int, batch: int = 1, padding: float = 0.0) -> dict:
        if batch != 1:
            raise ValueError(f"bench: mini_llava runs with batch=1 only, got batch={batch}")
        n_images = min(images, max(0, (length - 64) // 512))
        text_tokens = length - 256 * n_images
        filler = " ".join(words[i % len(words)] for i in range(text_tokens))
        content = []
        for i in range(n_images):
            content += [filler[: len(filler) // (n_images + 1)], synthetic_image(seed=i)]
        content.append(filler[: len(filler) // (n_images + 1)])
        # about one token per filler word: the record keeps the prompt's real length
        inputs = processor.prepare_inputs([{"role": "user", "content": content}])
        return {k: v.to(device) for k, v in inputs.items()}

    return BenchModel("mini_llava", model, make_inputs, model.config.text_config)


def load_bench_model(name: str, device: torch.device, dtype: torch.dtype) -> BenchModel:
    if name in RANDOM_SIZES:
        return random_llama(name, device, dtype)
    if name == "mini_llava":
        return mini_llava(device, dtype)
    raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join([*RANDOM_SIZES, 'mini_llava'])}")
