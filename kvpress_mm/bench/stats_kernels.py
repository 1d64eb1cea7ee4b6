"""One attention layer: H2O's per-key sums next to the attention itself, each form timed in one process.

    python -m kvpress_mm.bench.stats_kernels --device cuda --dtype bfloat16

For each (heads, kv heads, head dim, length) it prints the median time of sdpa's causal attention and of
the statistics computed the torch way (query chunks) and, on CUDA with Triton, by the Triton kernels,
as ratios against sdpa: the extra work a strategy that needs every query's probabilities adds to a layer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from ..attention_stats import accumulated_attention, attention_with_accumulated

# the bench's random models' layers (tiny, mid) and a GQA layer of a 7B-class model
SHAPES = {"tiny": (4, 4, 64), "mid": (16, 16, 64), "gqa_7b": (28, 4, 128)}


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (Triton compiles on the first call)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _torch_form(*args):
    previous = os.environ.get("KVPRESS_MM_TRITON")
    os.environ["KVPRESS_MM_TRITON"] = "0"
    try:
        return accumulated_attention(*args)
    finally:
        if previous is None:
            del os.environ["KVPRESS_MM_TRITON"]
        else:
            os.environ["KVPRESS_MM_TRITON"] = previous


def measure(shape: str, length: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    heads, kv_heads, head_dim = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, length, head_dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, kv_heads, length, head_dim, device=device, dtype=dtype, generator=g)
    v = torch.randn_like(k)
    scale = head_dim**-0.5
    row = {"shape": shape, "length": length, "dtype": str(dtype).removeprefix("torch.")}
    sdpa = _median_seconds(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=heads != kv_heads),
        device,
        repeats,
    )
    row["sdpa_ms"] = 1000 * sdpa
    row["torch_stats / sdpa"] = _median_seconds(lambda: _torch_form(q, k, scale), device, repeats) / sdpa
    if device.type == "cuda":
        from ..attention_stats import _triton_stats

        if _triton_stats() is not None:
            row["triton_stats / sdpa"] = (
                _median_seconds(lambda: accumulated_attention(q, k, scale), device, repeats) / sdpa
            )
    else:
        row["one_pass (attention + stats) / sdpa"] = (
            _median_seconds(lambda: attention_with_accumulated(q, k, v, scale), device, repeats) / sdpa
        )
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = [measure(shape, length, device, dtype, args.repeats) for shape in args.shapes for length in args.lengths]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print(
            "| "
            + " | ".join(f"{row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "-")) for k in keys)
            + " |"
        )
    return rows


if __name__ == "__main__":
    main()
