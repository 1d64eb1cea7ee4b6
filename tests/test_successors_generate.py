"""The successors inside generate() on every tiny family, and the cross-layer budget mechanism itself.

Padded batches on every family: eviction equals the masked full cache (vl_cache, aircache, madakv; meda merges and
is checked to compress and stay finite), budget 1.0 changes nothing, the layers keep the allocated counts; the
eager backend gives the same plans as sdpa; later prompts (compress="every_prompt") equal the held-mask reference.
A toy model-scope strategy checks the deferral (every layer's summary is taken before any layer is compacted) and
the checks on what allocate returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conversation import HeldRecorder, HeldReference, follow_up, turn_ids
from conversation import generate as turn
from helpers import generate, masked_reference_generate, rows_for, tiny

import kvpress_mm
from kvpress_mm.compressed_cache import CompressedLayer
from kvpress_mm.layer import AttentionNeeds, LayerKV, Plan
from kvpress_mm.selection import keep_top, per_kv_head
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.testing import TINY_FAMILIES

SUCCESSORS = ["vl_cache", "aircache", "meda", "madakv"]
NON_MERGING = ["vl_cache", "aircache", "madakv"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_successors_in_generate(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    ref_tokens, _ = generate(t.model, inputs, steps=4)
    for name in SUCCESSORS:
        with kvpress_mm.get_strategy(name, budget=1.0)(t.model):
            tokens, _ = generate(t.model, inputs, steps=4)
        assert torch.equal(tokens, ref_tokens), f"{name} at budget 1.0 changed the output of {family}"
        with kvpress_mm.get_strategy(name, budget=0.3)(t.model) as press:
            tokens, logits = generate(t.model, inputs, steps=4)
        assert torch.isfinite(logits).all() and press.compressed_any, name
        n_valid = inputs["attention_mask"].sum(-1)
        managed = sorted(press.kept)
        uniform = kvpress_mm.get_strategy(name, budget=0.3).kept_counts(n_valid, 0, len(managed))
        per_layer = torch.stack([press.kept[i].sum(-1) for i in managed])  # [layers, B, 1 | kv heads]
        kv_heads = per_layer.shape[-1]
        # the total over the layers is what uniform budgets keep (head-wise: summed over the kv heads)
        assert torch.equal(per_layer.sum((0, 2)), uniform * len(managed) * kv_heads), name
        if name in NON_MERGING:
            ref_tokens_masked, ref_logits = masked_reference_generate(t.model, inputs, dict(press.kept), steps=4)
            torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
            assert torch.equal(tokens, ref_tokens_masked)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_eager_backend_plans_like_sdpa(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    for name in SUCCESSORS:
        kept = []
        for backend in ("sdpa", "eager"):
            t.model.set_attn_implementation(backend)
            try:
                with kvpress_mm.get_strategy(name, budget=0.3)(t.model) as press:
                    generate(t.model, inputs, steps=2)
            finally:
                t.model.set_attn_implementation("sdpa")
            kept.append(dict(press.kept))
        for layer in kept[0]:
            assert torch.equal(kept[0][layer], kept[1][layer]), (name, layer)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llama"])
@pytest.mark.parametrize("name", NON_MERGING)
def test_every_prompt_turns_equal_held_reference(family, name):
    """Later turns are compressed too (S = the compressed past + the new tokens); logits equal the reference."""
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    strategy = kvpress_mm.get_strategy(name, budget=0.4, compress="every_prompt")
    logits, history, cache, seq = [], [], None, None
    cur = inputs
    with HeldRecorder(t.model) as rec:
        for k in range(3):
            if k:
                cur = follow_up(cur, seq, turn_ids(t, 2, 9 + 2 * k, seed=30 + k))
            with strategy(t.model) as press:
                seq, out, cache = turn(t.model, cur, 3, cache=cache)
            logits.append(out)
            history.append(cur)
        assert press.report.after_tokens != press.report.before_tokens  # the last turn was compressed
    ref, ref_cache = [], None
    with HeldReference(t.model, rec.held):
        for cur in history:
            _, out, ref_cache = turn(t.model, cur, 3, cache=ref_cache)
            ref.append(out)
    for k, (a, b) in enumerate(zip(logits, ref)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m, k=k: f"turn {k + 1}: {m}")
    assert any(isinstance(layer, CompressedLayer) for layer in cache.layers)


# ------------------------------------------------------------------------------------------------ the mechanism


@dataclass
class _Toy(EvictionStrategy):
    """H2O scores; layer budgets from a fixed shape (allocate), recording what it saw."""

    budget_scope: ClassVar[str] = "model"
    shape: tuple = (3.0, 1.0)
    broken: str = ""

    def __post_init__(self):
        super().__post_init__()
        self.seen: list = []

    def needs(self) -> AttentionNeeds:
        return AttentionNeeds(accumulated=True)

    def layer_summary(self, layer: LayerKV) -> torch.Tensor:
        self.seen.append((layer.layer_idx, layer.accumulated_attention is not None, self._compacted()))
        return torch.full((layer.batch,), self.shape[layer.layer_idx % len(self.shape)])

    def _compacted(self):
        cache = getattr(self, "cache", None)
        return cache is not None and any(isinstance(x, CompressedLayer) for x in cache.layers)

    def allocate(self, summaries, n_valid, num_layers):
        from kvpress_mm.selection import allocate_layers

        counts = allocate_layers(torch.stack(summaries), n_valid, self.kept_counts(n_valid, 0, num_layers))
        if self.broken == "total":
            counts[0] += 1
        elif self.broken == "shape":
            counts = counts[:1]
        elif self.broken == "float":
            counts = counts.float()
        return counts

    def plan(self, layer: LayerKV) -> Plan:
        return Plan(keep=keep_top(per_kv_head(layer.accumulated_attention, layer.groups), layer))


def test_model_scope_defers_compaction_and_keeps_the_allocation():
    from transformers import DynamicCache

    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t))
    strategy = _Toy(budget=0.3)
    cache = DynamicCache(config=t.model.config.get_text_config())
    strategy.cache = cache
    with strategy(t.model) as press:
        generate(t.model, inputs, steps=2, cache=cache)
    # both layers summarised, with their statistics, before either was compacted
    assert strategy.seen == [(0, True, False), (1, True, False)]
    n_valid = inputs["attention_mask"].sum(-1)
    uniform = strategy.kept_counts(n_valid, 0, 2)
    counts = [press.kept[i].sum(-1)[:, 0] for i in (0, 1)]
    assert torch.equal(counts[0] + counts[1], 2 * uniform)
    assert bool((counts[0] > counts[1]).all())  # 3:1


@pytest.mark.parametrize("broken,message", [("total", "uniform"), ("shape", "shape"), ("float", "integer")])
def test_bad_allocations_are_refused(broken, message):
    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t))
    with pytest.raises(ValueError, match=message), _Toy(budget=0.3, broken=broken)(t.model):
        generate(t.model, inputs, steps=1)
