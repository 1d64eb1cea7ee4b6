"""Caches kvpress-mm cannot compress are refused with one clear error (never "kept 100%" after doing
nothing), and a malformed plan is reported with the strategy's name and the shapes."""

from dataclasses import dataclass

import pytest
from helpers import generate, rows_for, tiny
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import QuantizedCache

import kvpress_mm
from kvpress_mm.layer import Plan
from kvpress_mm.selection import last_tokens
from kvpress_mm.strategy import EvictionStrategy


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_static_cache_implementation_is_refused(family):
    t = tiny(family)
    inputs = t.make_inputs(rows_for(t))
    with pytest.raises(ValueError, match=r"got a StaticCache.*without cache_implementation"):
        with kvpress_mm.get_strategy("snapkv", budget=0.3)(t.model):
            generate(t.model, inputs, steps=2, cache_implementation="static")


def test_static_cache_object_is_refused():
    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    cache = StaticCache(config=t.model.config, max_cache_len=128)
    with pytest.raises(ValueError, match="StaticCache"):
        with kvpress_mm.get_strategy("h2o", budget=0.3)(t.model):
            t.model(**inputs, cache=cache, use_cache=True)


def test_offloaded_cache_is_refused():
    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    cache = DynamicCache(config=t.model.config, offloading=True)
    with pytest.raises(ValueError, match="offloaded"):
        with kvpress_mm.get_strategy("h2o", budget=0.3)(t.model):
            t.model(**inputs, cache=cache, use_cache=True)


def test_a_cache_subclass_is_refused():
    class MyCache(DynamicCache):
        pass

    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    with pytest.raises(ValueError, match="got a MyCache"):
        with kvpress_mm.get_strategy("h2o", budget=0.3)(t.model):
            t.model(**inputs, cache=MyCache(config=t.model.config), use_cache=True)


def _quantized_cache(backend: str, config):
    """A QuantizedCache of `backend`; quanto's without optimum-quanto installed: the cache and the layers a real
    one has, made without their __init__ (which imports the backend)."""
    if backend == "fp8":  # no backend library needed
        return QuantizedCache("fp8", config)
    from transformers.cache_utils import Cache, DynamicLayer, QuantoQuantizedLayer

    layers = []
    for _ in range(config.get_text_config(decoder=True).num_hidden_layers):
        layer = object.__new__(QuantoQuantizedLayer)
        DynamicLayer.__init__(layer)
        layers.append(layer)
    cache = object.__new__(QuantizedCache)
    Cache.__init__(cache, layers=layers)
    return cache


@pytest.mark.parametrize("backend", ["fp8", "quanto"])
def test_quantized_cache_is_refused(backend):
    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    cache = _quantized_cache(backend, t.model.config)
    assert isinstance(cache, QuantizedCache) and len(cache.layers) == t.model.config.num_hidden_layers
    with pytest.raises(ValueError, match=r"kvpress-mm compresses DynamicCache.*got a QuantizedCache"):
        with kvpress_mm.get_strategy("snapkv", budget=0.3)(t.model):
            t.model(**inputs, cache=cache, use_cache=True)
    assert not t.model._forward_hooks and not t.model._forward_pre_hooks


def test_quantized_cache_implementation_is_refused():
    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    with pytest.raises(ValueError, match="got a QuantizedCache.*without cache_implementation"):
        with kvpress_mm.get_strategy("h2o", budget=0.3)(t.model):
            generate(t.model, inputs, steps=2, cache_implementation="quantized", cache_config={"backend": "fp8"})


def test_use_cache_false_is_refused():
    t = tiny("llava")
    inputs = t.make_inputs(rows_for(t))
    with pytest.raises(ValueError, match="use_cache=False"):
        with kvpress_mm.get_strategy("streaming_llm", budget=0.3)(t.model):
            generate(t.model, inputs, steps=2, use_cache=False)


def test_the_model_is_unchanged_after_a_refusal():
    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    backend = t.model.config._attn_implementation
    with pytest.raises(ValueError):
        with kvpress_mm.get_strategy("snapkv", budget=0.3)(t.model):
            generate(t.model, inputs, steps=2, cache_implementation="static")
    assert t.model.config._attn_implementation == backend
    assert not t.model._forward_hooks and not t.model._forward_pre_hooks


@dataclass
class _BadShapes(EvictionStrategy):
    """Keeps the first half but returns replacement keys/values of the wrong length (at every layer, or only
    at layer `only_layer`; the others get a good plan)."""

    what: str = "keys"
    only_layer: int | None = None

    def plan(self, layer):
        keep = layer.valid[:, None, :].clone()
        keep[..., layer.length // 2 :] = False
        keep &= layer.valid[:, None, :]
        keep[..., -1] = layer.valid[:, -1:]  # every row keeps its last real token
        if self.only_layer is not None and layer.layer_idx != self.only_layer:
            return Plan(keep=last_tokens(layer, layer.keep_count)[:, None, :])
        wrong = layer.keys[:, :, :-1]
        return Plan(keep=keep, **{self.what: wrong})


@pytest.mark.parametrize("what", ["keys", "values"])
def test_plan_with_wrong_state_shape_names_strategy_and_shapes(what):
    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    layer_shape = None
    with pytest.raises(ValueError) as err:
        with _BadShapes(budget=0.5, what=what)(t.model):
            out = t.model(**inputs, use_cache=True)
            layer_shape = out.cache.layers[0].keys.shape
    message = str(err.value)
    assert layer_shape is None
    b, length = inputs["input_ids"].shape
    assert f"_BadShapes.plan returned {what} of shape" in message
    assert f"{length - 1}" in message and f"{length}, 16)" in message


@pytest.mark.parametrize("what", ["keys", "values"])
def test_plan_with_wrong_state_shape_at_a_later_layer_names_strategy_and_shapes(what):
    """A bad plan at layer 1, after layer 0 was compacted: the ValueError itself, not an error of the
    half-compacted cache hiding it when the context exits."""
    t = tiny("llama")
    assert t.model.config.num_hidden_layers > 1
    inputs = t.make_inputs(rows_for(t))
    with pytest.raises(ValueError) as err:
        with _BadShapes(budget=0.5, what=what, only_layer=1)(t.model):
            t.model(**inputs, use_cache=True)
    message = str(err.value)
    length = inputs["input_ids"].shape[1]
    assert f"_BadShapes.plan returned {what} of shape" in message
    assert f"{length - 1}" in message and f"{length}, 16)" in message
    assert not t.model._forward_hooks and not t.model._forward_pre_hooks


@dataclass
class _RaisesAtLayer1(EvictionStrategy):
    """Keeps the last tokens at layer 0; raises `error` in plan at layer 1."""

    error: str = "runtime"

    def plan(self, layer):
        if layer.layer_idx == 1:
            if self.error == "interrupt":
                raise KeyboardInterrupt
            raise RuntimeError("boom at layer 1")
        return Plan(keep=last_tokens(layer, layer.keep_count)[:, None, :])


def test_an_error_raised_in_plan_at_a_later_layer_surfaces_as_itself():
    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    with pytest.raises(RuntimeError, match="boom at layer 1"):
        with _RaisesAtLayer1(budget=0.5)(t.model):
            generate(t.model, inputs, steps=2)
    with pytest.raises(KeyboardInterrupt):
        with _RaisesAtLayer1(budget=0.5, error="interrupt")(t.model):
            generate(t.model, inputs, steps=2)
    assert not t.model._forward_hooks and not t.model._forward_pre_hooks
    with kvpress_mm.get_strategy("snapkv", budget=0.5)(t.model):  # the model works in a new context
        generate(t.model, inputs, steps=2)
