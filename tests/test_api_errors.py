"""The public contract: budgets, registry, plugins and clear errors."""

import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from helpers import generate, rows_for, tiny

import kvpress_mm
from kvpress_mm.adapters import adapter_for
from kvpress_mm.budget import kept_counts
from kvpress_mm.testing import TINY_FAMILIES, build_tiny


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.0001, 7, math.nan, "0.2", None, True, float("inf")])
def test_bad_budget_names_value_and_range(budget):
    with pytest.raises(ValueError, match=r"budget") as err:
        kvpress_mm.get_strategy("snapkv", budget=budget)
    assert repr(budget) in str(err.value)


@pytest.mark.parametrize("budget_tokens", [0, -3, 2.5, "8", True])
def test_bad_budget_tokens(budget_tokens):
    with pytest.raises(ValueError, match="budget_tokens"):
        kvpress_mm.get_strategy("h2o", budget_tokens=budget_tokens)


def test_contradicting_budget_fields():
    with pytest.raises(ValueError, match="contradict"):
        kvpress_mm.get_strategy("h2o", budget=0.2, budget_tokens=16)


@pytest.mark.parametrize("budget", [1, 1.0])
def test_integer_one_means_keep_everything(budget):
    s = kvpress_mm.get_strategy("snapkv", budget=budget)
    assert torch.equal(s.kept_counts(torch.tensor([5, 17]), 0, 2), torch.tensor([5, 17]))


def test_budget_rule():
    n = torch.tensor([0, 1, 3, 10, 100, 100])
    assert kept_counts(n, 0.29).tolist() == [0, 1, 1, 2, 29, 29]
    assert kept_counts(n, 0.5).tolist() == [0, 1, 1, 5, 50, 50]
    assert kept_counts(n, 1.0, budget_tokens=4).tolist() == [0, 1, 3, 4, 4, 4]


def test_unknown_strategy_lists_registered_names():
    with pytest.raises(ValueError) as err:
        kvpress_mm.get_strategy("sideways")
    for name in ("full", "h2o", "snapkv", "streaming_llm"):
        assert name in str(err.value)


def test_unknown_field_lists_fields():
    with pytest.raises(ValueError, match="window_size"):
        kvpress_mm.get_strategy("snapkv", windw=3)


def test_registered_strategy_behaves_like_builtin():
    @kvpress_mm.register_strategy("test_keep_last")
    @dataclass
    class KeepLast(kvpress_mm.EvictionStrategy):
        def plan(self, layer):
            from kvpress_mm.selection import last_tokens

            return kvpress_mm.Plan(keep=last_tokens(layer, layer.keep_count)[:, None, :])

    assert "test_keep_last" in kvpress_mm.list_strategies()
    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    with kvpress_mm.get_strategy("test_keep_last", budget=0.5)(t.model) as press:
        generate(t.model, inputs, steps=2)
    assert press.report.after_tokens[0] == int(inputs["attention_mask"].sum(-1).max()) // 2


def test_entry_point_plugin(tmp_path):
    """A strategy of another installed package, found through the kvpress_mm.strategies entry point group."""
    pkg = tmp_path / "kvmm_plugin_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            from kvpress_mm import EvictionStrategy, Plan
            from kvpress_mm.selection import first_tokens

            @dataclass
            class KeepFirst(EvictionStrategy):
                def plan(self, layer):
                    return Plan(keep=first_tokens(layer, layer.keep_count)[:, None, :])
            """
        )
    )
    dist = tmp_path / "kvmm_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvmm-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kvpress_mm.strategies]\nkeep_first = kvmm_plugin_demo:KeepFirst\n")
    script = textwrap.dedent(
        """
        import kvpress_mm
        assert "keep_first" in kvpress_mm.list_strategies(), kvpress_mm.list_strategies()
        s = kvpress_mm.get_strategy("keep_first", budget=0.25)
        from kvpress_mm.testing import build_tiny
        t = build_tiny("llama")
        inputs = t.make_inputs([[("text", 40)]])
        with s(t.model) as press:
            t.model.generate(**inputs, max_new_tokens=2)
        assert press.kept[0][0, 0, :10].all() and not press.kept[0][0, 0, 10:].any()
        print("plugin ok")
        """
    )
    # the installed kvpress_mm (an install --target adds its folder to PYTHONPATH), never the source folder
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "plugin ok" in result.stdout


def test_unsupported_model_names_supported_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="gpt2") as err:
        kvpress_mm.get_strategy("h2o", budget=0.5)(model)
    # every family: the adapter of each tiny model family (llava, qwen2_vl, gemma3, idefics3, internvl, llama, ...)
    families = {adapter_for(SimpleNamespace(config=SimpleNamespace(model_type=f))).family for f in TINY_FAMILIES}
    assert families == set(kvpress_mm.supported_families())
    for family in families:
        assert family in str(err.value)


def test_missing_image_token_id_is_an_error():
    t = build_tiny("llava")
    t.model.config.image_token_id = None
    with pytest.raises(ValueError, match="image_token_id"):
        kvpress_mm.get_strategy("h2o", budget=0.5)(t.model)


def test_unsupported_attention_backend():
    t = build_tiny("llama")
    t.model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention"):
        with kvpress_mm.get_strategy("h2o", budget=0.5)(t.model):
            pass


def test_right_padding_is_rejected():
    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    inputs = {k: v.flip(-1) for k, v in inputs.items()}
    with pytest.raises(ValueError, match="left"):
        with kvpress_mm.get_strategy("h2o", budget=0.5)(t.model):
            t.model(**inputs)


def test_broken_plugin_plan_is_reported():
    @dataclass
    class KeepsPadding(kvpress_mm.EvictionStrategy):
        def plan(self, layer):
            return kvpress_mm.Plan(keep=torch.ones_like(layer.valid)[:, None, :])

    t = tiny("llama")
    inputs = t.make_inputs(rows_for(t))
    with pytest.raises(ValueError, match="padding"):
        with KeepsPadding(budget=0.5)(t.model):
            t.model(**inputs)
