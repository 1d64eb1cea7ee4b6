"""Field validation (kvpress_mm.validate): at construction, on assignment, warnings for ignored fields."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import warnings

import hydra.utils
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from transformers import DynamicCache

import kvpress_mm
from kvpress_mm.eval import get_task
from kvpress_mm.merge import MERGE_MODES, MERGE_SCOPES
from kvpress_mm.registry import list_strategies, strategy_class
from kvpress_mm.strategy import COMPRESS_MODES, PHASES
from kvpress_mm.validate import (
    FieldTypeError,
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_mapping,
    check_number,
)

# strategies AdaKV can wrap (they have scores(layer))
SCORING = ["snapkv", "h2o", "tova", "knorm", "random", "pyramidkv", "look_m", "mean_h2o"]
BIG = 2**40

# what each strategy field accepts: (kind, options); a field missing here fails test_every_field_has_a_spec
SPECS = {
    "budget": ("number", dict(low=0.0, high=1.0, low_open=True)),
    "budget_tokens": ("int", dict(low=1, allow_none=True)),
    "recent_share": ("number", dict(low=0.0, high=1.0)),
    "alpha_safeguard": ("number", dict(low=0.0, high=1.0)),
    "sinks": ("int", dict(low=0)),
    "window_size": ("int", dict(low=1)),
    "kernel_size": ("int", dict(low=1)),
    "beta": ("int", dict(low=1)),
    "seed": ("int", dict(low=0, high=2**32 - 1)),
    "compress_every": ("int", dict(low=1)),
    "phase": ("choice", dict(choices=PHASES)),
    "compress": ("choice", dict(choices=COMPRESS_MODES)),
    "pooling": ("choice", dict(choices=("avg", "max"))),
    "merge": ("choice", dict(choices=MERGE_MODES)),
    "merge_scope": ("choice", dict(choices=MERGE_SCOPES)),
    "text_prior_mode": ("choice", dict(choices=("strict_budget", "keep_all_text"))),
    "score": ("choice", dict(choices=("sum", "mean"))),
    "text_prior": ("bool", {}),
    "inner": ("choice", dict(choices=tuple(SCORING))),
    "inner_fields": ("mapping", {}),
    "sparsity_threshold": ("number", dict(low=0.0, high=1.0)),
    "uniform_share": ("number", dict(low=0.0, high=1.0)),
    "relevancy_threshold": ("number", dict(low=0.0, high=1.0)),
    "coverage": ("number", dict(low=0.0, high=1.0, low_open=True)),
    "text_first": ("bool", {}),
    "entropy": ("choice", dict(choices=("cross_modal", "all"))),
    "compensation": ("choice", dict(choices=("sequential", "proportional"))),
    "spans": ("choice", dict(choices=("none", "chunks"))),
    "span_size": ("int", dict(low=1)),
    "profile": ("choice", dict(choices=("auto",))),  # or a head profile file; any other string is refused
    "allocation": ("choice", dict(choices=("model", "layer"))),
    "base": ("choice", dict(choices=("snapkv", "adakv", "sparsemm", "h2o", "pyramidkv"))),
    "base_fields": ("mapping", {}),
    "intrinsic": ("bool", {}),
    "weighting": ("choice", dict(choices=("redundancy", "equal"))),
    "ranking": ("choice", dict(choices=("accumulated", "window"))),
    "head_budgets": ("choice", dict(choices=("model", "layer", "uniform"))),
    "instruction": ("choice", dict(choices=("repeat", "none"))),
    "modality_budgets": ("choice", dict(choices=("shared", "proportional"))),
    "chunk_size": ("int", dict(low=1)),
    "overlap": ("int", dict(low=0)),
}

FIELDS = [(name, f.name) for name in list_strategies() for f in dataclasses.fields(strategy_class(name)[0])]


def _state(strategy) -> dict:
    return dict(vars(strategy))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _build(name, **fields):
    return _quiet(kvpress_mm.get_strategy, name, **fields)


# --- the shared validators -------------------------------------------------------------------------


def test_wrong_type_is_a_type_error_and_a_value_error():
    with pytest.raises(FieldTypeError) as err:
        check_int("Owner", "size", "3", minimum=1)
    assert isinstance(err.value, TypeError) and isinstance(err.value, ValueError)
    assert str(err.value) == "Owner: size must be an integer >= 1, got '3' (str)"
    with pytest.raises(ValueError) as err:
        check_int("Owner", "size", 0, minimum=1)
    assert not isinstance(err.value, TypeError)
    assert str(err.value) == "Owner: size must be an integer >= 1, got 0"


@pytest.mark.parametrize(
    "check, value, message",
    [
        (lambda v: check_int("O", "n", v, 0, 9), True, "O: n must be an integer in [0, 9], got True (bool)"),
        (lambda v: check_int("O", "n", v, 0, 9), 10, "O: n must be an integer in [0, 9], got 10"),
        (
            lambda v: check_int("O", "n", v, 1, allow_none=True),
            2.0,
            "O: n must be an integer >= 1 or None, got 2.0 (float)",
        ),
        (lambda v: check_fraction("O", "f", v, low_open=True), 0, "O: f must be a number in (0, 1], got 0"),
        (lambda v: check_fraction("O", "f", v), math.nan, "O: f must be a number in [0, 1], got nan"),
        (lambda v: check_number("O", "x", v, 0), math.inf, "O: x must be a number >= 0, got inf"),
        (lambda v: check_number("O", "x", v, 0, 1, high_open=True), 1.0, "O: x must be a number in [0, 1), got 1.0"),
        (lambda v: check_choice("O", "c", v, ("a", "b")), "z", "O: c must be one of a, b; got 'z'"),
        (lambda v: check_choice("O", "c", v, ("a", "b")), 3, "O: c must be one of a, b; got 3 (int)"),
        (lambda v: check_bool("O", "b", v), 1, "O: b must be true or false, got 1 (int)"),
        (lambda v: check_mapping("O", "m", v), [1], "O: m must be a mapping of field names to values, got [1] (list)"),
    ],
)
def test_validator_messages_name_owner_field_value_and_allowed(check, value, message):
    with pytest.raises(ValueError) as err:
        check(value)
    assert str(err.value) == message


def test_validators_return_good_values():
    assert check_int("O", "n", 3, 1) == 3 and check_int("O", "n", None, allow_none=True) is None
    assert check_fraction("O", "f", 1) == 1 and check_choice("O", "c", "a", ("a",)) == "a"
    assert check_mapping("O", "m", OmegaConf.create({"a": 1})) is not None


# --- construction ----------------------------------------------------------------------------------


def test_random_seed_string_fails_at_construction_naming_seed():
    with pytest.raises(TypeError) as err:
        kvpress_mm.get_strategy("random", seed="a")
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "seed" in message and "'a'" in message and "must be an integer" in message


@pytest.mark.parametrize(
    "name, fields, named",
    [
        ("random", dict(seed=-1), ["seed", "-1"]),
        ("random", dict(seed=True), ["seed", "True"]),
        ("random", dict(seed=1.5), ["seed", "1.5"]),
        ("h2o", dict(recent_share="0.5"), ["recent_share", "'0.5'"]),
        ("h2o", dict(recent_share=math.nan), ["recent_share", "nan"]),
        ("h2o", dict(compress_every=2.0), ["compress_every", "2.0"]),
        ("h2o", dict(phase=None), ["phase", "None"]),
        ("look_m", dict(recent_share="x"), ["recent_share", "'x'"]),
        ("look_m", dict(sinks=True), ["sinks", "True"]),
        ("look_m", dict(text_prior=1), ["text_prior", "1"]),
        ("look_m", dict(merge=None), ["merge", "None"]),
        ("adakv", dict(alpha_safeguard="0.2"), ["alpha_safeguard", "'0.2'"]),
        ("adakv", dict(alpha_safeguard=math.inf), ["alpha_safeguard", "inf"]),
        ("adakv", dict(inner=3), ["inner", "3"]),
        ("adakv", dict(inner="nope"), ["inner", "'nope'", "snapkv"]),
        ("adakv", dict(inner_fields="window_size=4"), ["inner_fields", "'window_size=4'"]),
        ("adakv", dict(inner_fields={"budget": 0.3}), ["inner_fields", "budget"]),
        ("adakv", dict(inner_fields={"windw": 3}), ["inner_fields", "windw", "window_size"]),
        ("adakv", dict(inner_fields={"window_size": 0}), ["inner_fields", "window_size", "0"]),
        ("snapkv", dict(pooling=1), ["pooling", "1", "avg", "max"]),
        ("pyramidkv", dict(window_size=0), ["PyramidKV", "window_size", "0"]),
        ("pyramidkv", dict(beta=2.5), ["beta", "2.5"]),
        ("streaming_llm", dict(sinks=-2), ["sinks", "-2"]),
        ("mean_h2o", dict(score="median"), ["score", "'median'", "sum", "mean"]),
    ],
)
def test_bad_fields_fail_at_construction(name, fields, named):
    with pytest.raises(ValueError) as err:
        kvpress_mm.get_strategy(name, **fields)
    for text in named:
        assert text in str(err.value), (text, str(err.value))


def test_every_field_has_a_spec():
    missing = sorted({f"{name}.{field}" for name, field in FIELDS if field not in SPECS})
    assert not missing, f"add these fields to SPECS (and validate them): {missing}"


def _wrong_type(field):
    kind, _ = SPECS[field]
    return {"number": "0.5", "int": "3", "choice": 3, "bool": "yes", "mapping": "a=1"}[kind]


@pytest.mark.parametrize("name, field", FIELDS)
def test_every_field_is_type_checked_at_construction(name, field):
    value = _wrong_type(field)
    with pytest.raises(TypeError) as err:
        _build(name, **{field: value})
    assert isinstance(err.value, ValueError) and field in str(err.value) and repr(value) in str(err.value)


def test_every_registered_default_builds_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in list_strategies():
            kvpress_mm.get_strategy(name)
            kvpress_mm.get_strategy(name, budget=1.0)


# --- assignment --------------------------------------------------------------------------------------


def test_assigning_nan_budget_raises_and_keeps_the_old_value():
    s = kvpress_mm.get_strategy("snapkv", budget=0.3)
    with pytest.raises(ValueError, match="budget.*nan"):
        s.budget = float("nan")
    assert s.budget == 0.3
    assert s.kept_counts(torch.tensor([100]), 0, 2).tolist() == [30]


def test_assignment_is_checked_against_the_other_fields():
    s = kvpress_mm.get_strategy("h2o", budget=0.3)
    with pytest.raises(ValueError, match="contradict"):
        s.budget_tokens = 8
    assert (s.budget, s.budget_tokens) == (0.3, None)
    s.budget = 1.0
    s.budget_tokens = 8
    with pytest.raises(ValueError, match="contradict"):
        s.budget = 0.5
    assert (s.budget, s.budget_tokens) == (1.0, 8)
    assert s.kept_counts(torch.tensor([100]), 0, 2).tolist() == [8]


def test_good_assignment_works_and_reaches_derived_state():
    s = kvpress_mm.get_strategy("adakv", budget=0.5, inner="h2o")
    s.budget = 0.25
    assert s.kept_counts(torch.tensor([100]), 0, 2).tolist() == [25]
    s.inner = "snapkv"
    s.inner_fields = {"window_size": 3}
    assert s.needs().window == 3
    with pytest.raises(ValueError, match="inner_fields"):
        s.inner_fields = {"window_size": -1}
    assert s.inner_fields == {"window_size": 3} and s.needs().window == 3


def test_non_field_attributes_are_not_validated():
    s = kvpress_mm.get_strategy("snapkv")
    s.note = "anything"
    assert s.note == "anything"


def test_replace_deepcopy_pickle_keep_validation():
    s = kvpress_mm.get_strategy("adakv", budget=0.5, inner="h2o", inner_fields={"recent_share": 0.3})
    copies = [dataclasses.replace(s), copy.deepcopy(s), copy.copy(s), pickle.loads(pickle.dumps(s))]
    for c in copies:
        assert c == s
        assert c.kept_counts(torch.tensor([10]), 0, 2).tolist() == [5]
        with pytest.raises(ValueError, match="budget"):
            c.budget = -1
        assert c == s
    with pytest.raises(ValueError, match="alpha_safeguard"):
        dataclasses.replace(s, alpha_safeguard=2.0)
    assert dataclasses.replace(s, budget=0.2).kept_counts(torch.tensor([10]), 0, 2).tolist() == [2]


def test_hydra_instantiate():
    config = OmegaConf.create(
        {
            "_target_": "kvpress_mm.strategies.adakv.AdaKV",
            "budget": 0.3,
            "inner": "h2o",
            "inner_fields": {"recent_share": 0.25},
        }
    )
    s = hydra.utils.instantiate(config)
    assert (s.budget, s.inner, dict(s.inner_fields)) == (0.3, "h2o", {"recent_share": 0.25})
    look = hydra.utils.instantiate({"_target_": "kvpress_mm.strategies.look_m.LookM", "budget": 0.2, "sinks": 2})
    assert look == kvpress_mm.get_strategy("look_m", budget=0.2, sinks=2)
    with pytest.raises(ValueError, match="sinks"):
        look.sinks = -1


# --- ignored fields ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fields, named",
    [
        ("full", dict(budget=0.05), "budget=0.05"),
        ("full", dict(budget_tokens=16), "budget_tokens=16"),
        ("h2o", dict(compress_every=4), "compress_every=4"),
        ("streaming_llm", dict(phase="prefill", compress_every=2), "compress_every=2"),
        ("look_m", dict(merge="none", merge_scope="same_modality"), "merge_scope='same_modality'"),
        ("look_m", dict(text_prior=False, text_prior_mode="keep_all_text"), "text_prior_mode='keep_all_text'"),
        ("snapkv", dict(kernel_size=1, pooling="max"), "pooling='max'"),
        ("adakv", dict(inner="h2o", inner_fields={"phase": "both"}), "inner_fields['phase']='both'"),
        ("adakv", dict(inner="look_m", inner_fields={"merge": "averaged"}), "inner_fields['merge']='averaged'"),
    ],
)
def test_ignored_fields_warn(name, fields, named):
    with pytest.warns(UserWarning, match="is ignored") as record:
        kvpress_mm.get_strategy(name, **fields)
    messages = [str(w.message) for w in record]
    assert any(named in m for m in messages), messages
    assert record[0].filename == __file__  # points at the caller, not at the library


def test_full_budget_warns_on_assignment_too():
    s = kvpress_mm.get_strategy("full")
    with pytest.warns(UserWarning, match="Full: budget=0.05 is ignored"):
        s.budget = 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.budget = 1.0


def test_used_fields_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kvpress_mm.get_strategy("full", budget=1.0)
        kvpress_mm.get_strategy("h2o", phase="both", compress_every=4)
        kvpress_mm.get_strategy("look_m", merge="averaged", merge_scope="same_modality")
        kvpress_mm.get_strategy("look_m", text_prior=True, text_prior_mode="keep_all_text")
        kvpress_mm.get_strategy("snapkv", kernel_size=3, pooling="max")
        kvpress_mm.get_strategy("adakv", inner="h2o", inner_fields={"recent_share": 0.2})


# --- cache_size and tasks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value, named", [(None, "got None"), ((("k", "v"),), "tuple"), ("cache", "'cache'")])
def test_cache_size_of_a_non_cache_is_a_clear_type_error(value, named):
    with pytest.raises(TypeError) as err:
        kvpress_mm.cache_size(value)
    message = str(err.value)
    assert named in message and "Cache" in message and "DynamicCache" in message


def test_cache_size_of_a_generate_output_points_at_past_key_values():
    class Output:
        past_key_values = DynamicCache()

    with pytest.raises(TypeError, match=r"got Output.*\.past_key_values"):
        kvpress_mm.cache_size(Output())
    assert kvpress_mm.cache_size(DynamicCache()).tokens == 0


def test_task_fields_use_the_shared_checks():
    with pytest.raises(TypeError, match=r"n_samples must be an integer >= 1, got '3' \(str\)"):
        get_task("text_needle", n_samples="3")
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        get_task("text_needle", seed=-1)


@pytest.mark.parametrize(
    "task, owner, field, allowed",
    [
        ("image_needle", "ImageNeedle", "needle", "shape, digit, star"),
        ("image_needle", "ImageNeedle", "ask", "content, colour, index"),
        ("image_lookup", "ImageLookup", "cue", "name, index"),
        ("image_lookup", "ImageLookup", "question", "shape, colour, digit, mixed"),
        ("image_in_text", "ImageInText", "question", "colour, shape, digit, mixed"),
    ],
)
def test_task_choices_use_the_shared_check(task, owner, field, allowed):
    """One wording for every choice: the task, the field, the allowed values, the value; a wrong type is a
    TypeError (and still a ValueError)."""
    with pytest.raises(ValueError) as err:
        get_task(task, **{field: "sideways"})
    assert str(err.value) == f"{owner}: {field} must be one of {allowed}; got 'sideways'"
    with pytest.raises(TypeError) as err:
        get_task(task, **{field: 3})
    assert isinstance(err.value, ValueError)
    assert str(err.value) == f"{owner}: {field} must be one of {allowed}; got 3 (int)"


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (
            {"queries": "first"},
            ValueError,
            "AttentionNeeds: queries must be one of last, recent, post_vision, text, elite; got 'first'",
        ),
        (
            {"queries": 3},
            TypeError,
            "AttentionNeeds: queries must be one of last, recent, post_vision, text, elite; got 3 (int)",
        ),
        (
            {"cross_modal": "some"},
            ValueError,
            "AttentionNeeds: cross_modal must be one of none, between, all; got 'some'",
        ),
        ({"window": -1}, ValueError, "AttentionNeeds: window must be an integer >= 0, got -1"),
        ({"window": 1.5}, TypeError, "AttentionNeeds: window must be an integer >= 0, got 1.5 (float)"),
        (
            {"sparsity": "0.1"},
            TypeError,
            "AttentionNeeds: sparsity must be a number in [0, 1] (a threshold), got '0.1' (str)",
        ),
        (
            {"elite_threshold": math.nan},
            ValueError,
            "AttentionNeeds: elite_threshold must be a number in [0, 1], got nan",
        ),
    ],
)
def test_attention_needs_fields_use_the_shared_checks(fields, error, message):
    with pytest.raises(error) as err:
        kvpress_mm.AttentionNeeds(**fields)
    assert str(err.value) == message


# --- property: every field of every registered strategy, assigned after construction ----------------------


def _ints_outside(low, high):
    outside = []
    if low is not None:
        outside.append(st.integers(-BIG, low - 1))
    if high is not None:
        outside.append(st.integers(high + 1, BIG))
    return outside


def _bad_values(field, name):
    kind, o = SPECS[field]
    always = [st.text(max_size=5), st.just(object()), st.lists(st.integers(), max_size=2)]
    if kind == "number":
        low, high = o["low"], o["high"]
        # below the range (0 and -0.0 included when the range is open there), above it
        below = st.floats(max_value=low, allow_nan=False) if o.get("low_open") else st.floats(max_value=low - 1e-9)
        outside = st.one_of(below, st.floats(min_value=high, exclude_min=True, allow_nan=False))
        return st.one_of(
            st.just(math.nan), st.just(math.inf), st.just(-math.inf), outside, st.booleans(), st.none(), *always
        )
    if kind == "int":
        bad = [st.floats(), st.booleans(), *always]
        if not o.get("allow_none"):
            bad.append(st.none())
        return st.one_of(*bad, *_ints_outside(o.get("low"), o.get("high")))
    if kind == "choice":
        choices = o["choices"]
        others = st.text(max_size=12).filter(lambda s: s not in choices)
        if field == "inner":
            others = st.sampled_from(["adakv", "full", "streaming_llm", "sideways"]) | others
        return st.one_of(others, st.integers(), st.none(), st.booleans(), st.floats(), *always[1:])
    if kind == "bool":
        return st.one_of(st.integers(0, 1), st.text(max_size=5), st.none(), st.floats(), *always[1:])
    # mapping (adakv inner_fields, inner is snapkv by default)
    return st.one_of(
        st.text(max_size=5),
        st.lists(st.integers(), max_size=2),
        st.integers(),
        st.none(),
        st.sampled_from(
            [{"budget": 0.3}, {"budget_tokens": 4}, {"windw": 1}, {"window_size": 0}, {"window_size": "4"}, {1: 2}]
        ),
    )


def _good_values(field, strategy):
    kind, o = SPECS[field]
    if field == "budget" and strategy.budget_tokens is not None:
        return st.just(1.0)
    if field == "budget_tokens" and strategy.budget != 1.0:
        return st.none()
    if kind == "number":
        return st.floats(o["low"], o["high"], exclude_min=o.get("low_open", False)) | st.sampled_from([o["high"]])
    if kind == "int":
        good = st.integers(o["low"], o.get("high", o["low"] + 1000))
        return good | st.none() if o.get("allow_none") else good
    if kind == "choice":
        return st.sampled_from(o["choices"])
    if kind == "bool":
        return st.booleans()
    return st.sampled_from([{}, {"window_size": 4}, {"kernel_size": 3, "pooling": "max"}])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.parametrize("name, field", FIELDS)
@given(data=st.data())
def test_assigning_a_bad_value_raises_and_changes_nothing(name, field, data):
    strategy = _build(name)
    before = _state(strategy)
    bad = data.draw(_bad_values(field, name), label="bad")
    with pytest.raises(ValueError):
        _quiet(setattr, strategy, field, bad)
    assert _state(strategy) == before
    good = data.draw(_good_values(field, strategy), label="good")
    _quiet(setattr, strategy, field, good)
    assert getattr(strategy, field) == good
    assert strategy == _build(name, **{f.name: getattr(strategy, f.name) for f in dataclasses.fields(strategy)})
