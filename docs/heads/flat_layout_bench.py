"""KV bytes and decode speed of the flat layout (layout="flat") against the padded one, head-wise budgets, mini_llava.

    HF_HUB_OFFLINE=1 python docs/heads/flat_layout_bench.py          # ~5 minutes on 2 shared CPU cores

One image_needle prompt (sample 0, 1,029 tokens), float32, one thread. For each strategy and budget: the prompt is
compressed once per layout (generate, 1 token), then `STEPS` greedy decode steps are timed one forward at a time
inside the strategy context, the two layouts taking turns step by step, `ROUNDS` times; the median step is
reported (the machine is shared: turns expose both layouts to the same load). Prints one Markdown row per
(strategy, budget): KV MiB after compression of each layout, the kept tokens' MiB (the sum over layers, rows and
kv heads of the kept counts, keys + values), the ratio flat / kept, decode ms per token of each layout, and
whether the decoded tokens are equal.
"""

from __future__ import annotations

import statistics
import time

import torch

import kvpress_mm
from kvpress_mm.compressed_cache import FlatLayer
from kvpress_mm.eval import get_task, load_model

STEPS = 24
ROUNDS = 3
CASES = [("adakv", 0.1), ("adakv", 0.2), ("sparsemm", 0.1), ("sparsemm", 0.2)]


def compress(bundle, strategy, inputs, layout):
    with strategy(bundle.model, layout=layout) as session:
        out = bundle.model.generate(
            **inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True, **bundle.generate_kwargs
        )
    return out.sequences, out.past_key_values, session


@torch.no_grad()
def decode(bundle, strategy, runs, mask):
    """STEPS greedy steps on a copy of each layout's cache, the layouts taking turns step by step (the machine's
    load hits both alike), inside one strategy context (a layer's attention follows its type, not the context's
    layout). Appends each step's seconds to run["times"] and sets run["tokens"]."""
    model = bundle.model
    state = {layout: (run["seq"][:, -1:], run["cache"].fork(), mask, []) for layout, run in runs.items()}
    with strategy(model):
        for step in range(STEPS):
            for layout, (token, cache, mask, tokens) in state.items():
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                start = time.perf_counter()
                out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
                if step >= 2:  # the first steps warm up
                    runs[layout]["times"].append(time.perf_counter() - start)
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(token)
                state[layout] = (token, cache, mask, tokens)
    for layout, (_, _, _, tokens) in state.items():
        runs[layout]["tokens"] = torch.cat(tokens, 1)


def kept_bytes(session, cache) -> int:
    total = 0
    for idx, keep in session.kept.items():
        layer = cache.layers[idx]
        b, heads, _, dim = layer.keys.shape
        total += int(keep.expand(b, heads, keep.shape[-1]).sum()) * 2 * dim * layer.keys.element_size()
    return total


def main() -> None:
    torch.set_num_threads(1)
    bundle = load_model("mini_llava")
    sample = get_task("image_needle", n_samples=1).samples()[0]
    inputs = bundle.prepare([sample])
    mib = 2**20
    print(f"mini_llava, image_needle sample 0: {inputs['input_ids'].shape[1]} prompt tokens, float32, 1 thread\n")
    print(
        "| strategy | budget | padded MiB | flat MiB | kept tokens MiB | flat / kept | padded ms/token | "
        "flat ms/token | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, budget in CASES:
        strategy = kvpress_mm.get_strategy(name, budget=budget)
        runs = {}
        for layout in ("padded", "flat"):
            seq, cache, session = compress(bundle, strategy, inputs, layout)
            runs[layout] = {"seq": seq, "cache": cache, "session": session, "times": []}
        assert any(isinstance(layer, FlatLayer) for layer in runs["flat"]["cache"].layers)
        for _ in range(ROUNDS):
            decode(bundle, strategy, runs, inputs["attention_mask"])
        padded, flat = runs["padded"], runs["flat"]
        kept = kept_bytes(flat["session"], flat["cache"])
        after = {layout: run["session"].report.after_bytes for layout, run in runs.items()}
        ms = {layout: 1e3 * statistics.median(run["times"]) for layout, run in runs.items()}
        print(
            f"| {name} | {budget} | {after['padded'] / mib:.2f} | {after['flat'] / mib:.2f} | {kept / mib:.2f} | "
            f"{after['flat'] / kept:.3f} | {ms['padded']:.1f} | {ms['flat']:.1f} | "
            f"{bool(torch.equal(padded['tokens'], flat['tokens']))} |"
        )


if __name__ == "__main__":
    main()
