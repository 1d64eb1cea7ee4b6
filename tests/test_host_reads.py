"""A prefill reads few values back to the host per layer: on a GPU each read (bool(), int(), .tolist())
waits for every queued kernel, so a read per check would stall the launch queue at every layer."""

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


def _reads(model, name: str, padded: bool) -> int:
    ids = torch.randint(3, 128, (2 if padded else 1, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :20] = 0
    with torch.no_grad(), kvpress_mm.get_strategy(name, budget=0.3)(model) as press:
        counter = _CountReads()
        with counter:
            model(input_ids=ids, attention_mask=mask, cache=DynamicCache(config=model.config), use_cache=True)
    assert len(press.kept) == model.config.num_hidden_layers
    return sum(counter.reads.values())


# per compressed layer: whether it evicts, the plan's checks with the kept share, the compacted layout; top-k
# selection adds its size, LOOK-M's merge its matching layout (per prompt: the real positions, a few checks)
@pytest.mark.parametrize("name,per_layer", [("streaming_llm", 3), ("h2o", 4), ("snapkv", 4), ("look_m", 5)])
@pytest.mark.parametrize("padded", [False, True])
def test_host_reads_per_layer(name, per_layer, padded):
    two, four = _reads(_llama(2), name, padded), _reads(_llama(4), name, padded)
    assert (four - two) / 2 == per_layer
    assert two - 2 * per_layer <= 5  # once per prompt
