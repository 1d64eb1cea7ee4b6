"""KV bytes after compression vs the bytes of the tokens the heads keep, for head-wise budgets on mini_llava.

    HF_HUB_OFFLINE=1 python docs/heads/headwise_memory.py        # ~1 minute on 2 CPU cores

The compacted layer is [batch, kv_heads, slots, head_dim] with slots = the largest head's count in that layer
(the other heads' spare slots masked), so its bytes are kv_heads * max_h(count_h) per layer, while the kept
tokens themselves need sum_h(count_h) (the padded layout, measured here; the flat one stores only those:
docs/heads/flat_layout_bench.py). Prints one Markdown row per (strategy, budget): the full prompt cache,
the physical cache after compression, the kept tokens' bytes, and the padding's share of the physical cache.
"""

from __future__ import annotations

import torch

import kvpress_mm
from kvpress_mm.eval import get_task, load_model

STRATEGIES = {
    "snapkv": {},
    "adakv": {},
    "sparsemm": {},
    "sparsemm (allocation=layer)": {"allocation": "layer"},
    "mixkv (base=sparsemm)": {"base": "sparsemm"},
}


def main() -> None:
    torch.set_num_threads(1)
    bundle = load_model("mini_llava")
    sample = get_task("image_needle", n_samples=1).samples()[0]
    inputs = bundle.prepare([sample])
    length = inputs["input_ids"].shape[1]
    print(f"mini_llava, image_needle sample 0: {length} prompt tokens, 30 layers x 3 kv heads, float32\n")
    print("| strategy | budget | full MiB | after MiB | kept tokens MiB | padding share | widest layer: head counts |")
    print("|---|---|---|---|---|---|---|")
    for label, fields in STRATEGIES.items():
        name = label.split(" ")[0]
        for budget in (0.1, 0.2):
            strategy = kvpress_mm.get_strategy(name, budget=budget, **fields)
            with strategy(bundle.model, layout="padded") as press:  # the flat layout: flat_layout_bench.py
                bundle.model.generate(**inputs, max_new_tokens=1, do_sample=False, **bundle.generate_kwargs)
            report = press.report
            per_token = None
            kept_bytes = 0
            widest = (0, None)
            for idx, keep in press.kept.items():
                layer = report.layers[idx]
                per_token = layer.before_bytes / (layer.before_tokens * keep.shape[0] * 3)  # one kv head, K and V
                counts = keep.expand(keep.shape[0], 3, keep.shape[2]).sum(-1)[0]
                kept_bytes += int(counts.sum()) * per_token
                spread = int(counts.max() - counts.min())
                if spread >= widest[0]:
                    widest = (spread, f"layer {idx}: {counts.tolist()}")
            mib = 2**20
            padding = 1 - kept_bytes / report.after_bytes
            print(
                f"| {label} | {budget} | {report.before_bytes / mib:.1f} | {report.after_bytes / mib:.2f} | "
                f"{kept_bytes / mib:.2f} | {padding:.0%} | {widest[1]} |"
            )


if __name__ == "__main__":
    main()
