"""A prefill reads few values back to the host per layer: on a GPU each read (bool(), int(), .tolist())
waits for every queued kernel, so a read per check would stall the launch queue at every layer. Strategies
that keep their budget rule's counts read nothing per layer."""

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache

import kvpress_mm

_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__"}


class _CountReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def _llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def _reads(model, name: str | None, padded: bool) -> int:
    ids = torch.randint(3, 128, (2 if padded else 1, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :20] = 0
    if name is None:  # the plain prefill: the model's own reads (its mask checks)
        counter = _CountReads()
        with torch.no_grad(), counter:
            model(input_ids=ids, attention_mask=mask, cache=DynamicCache(config=model.config), use_cache=True)
        return sum(counter.reads.values())
    with torch.no_grad(), kvpress_mm.get_strategy(name, budget=0.3)(model) as press:
        counter = _CountReads()
        with counter:
            model(input_ids=ids, attention_mask=mask, cache=DynamicCache(config=model.config), use_cache=True)
    assert len(press.kept) == model.config.num_hidden_layers
    return sum(counter.reads.values())


# Per compressed layer: nothing for a strategy that keeps its budget rule's counts (the layout's sizes are
# known on the host from the prompt's real lengths; the plans' checks are read once, at the forward's end).
# LOOK-M: keep_top's size (selection.py) and the merge's matching layout. Per prompt, beyond the model's own:
# the prompt's labels and real positions (2), the real lengths of a padded batch (1), every layer's counts
# handed to the prompt and layer 0's own question to it (2, strategies with statistics), the plans' checks (1),
# the padded mask's form (1, the one-pass statistics).
@pytest.mark.parametrize(
    "name,per_layer,per_prompt",  # per prompt: (one row, a padded batch)
    [
        ("streaming_llm", 0, (3, 4)),
        ("knorm", 0, (3, 4)),
        ("h2o", 0, (5, 7)),
        ("snapkv", 0, (5, 6)),
        ("look_m", 2, (5, 7)),
    ],
)
@pytest.mark.parametrize("padded", [False, True])
def test_host_reads_per_layer(name, per_layer, per_prompt, padded):
    two, four = _reads(_llama(2), name, padded), _reads(_llama(4), name, padded)
    assert (four - two) / 2 == per_layer
    assert two - 2 * per_layer - _reads(_llama(2), None, padded) <= per_prompt[padded]
