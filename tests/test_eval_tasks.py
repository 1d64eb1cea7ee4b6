"""Evaluation tasks: determinism, layout of the facts and images, scoring, registry errors."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from kvpress_mm.eval import Sample, Task, get_task, list_tasks, register_task, task_fields
from kvpress_mm.eval.tasks.filler import FACT_NAMES, TEMPLATES, filler_sentences
from kvpress_mm.eval.tasks.layout import insert_at_depths


def _fingerprint(samples: list[Sample]) -> list:
    return [
        (s.id, s.answer, [c if isinstance(c, str) else c.tobytes() for c in s.content], sorted(s.meta.items()))
        for s in samples
    ]


def test_registry_lists_the_tasks():
    assert {"text_needle", "multi_fact", "fidelity"} <= set(list_tasks())
    assert "needle_depth" in task_fields("text_needle")


def test_unknown_task_and_field_errors_list_the_options():
    with pytest.raises(ValueError, match="available tasks: .*fidelity.*multi_fact.*text_needle"):
        get_task("needle")
    with pytest.raises(ValueError, match=r"no field\(s\) depth; its fields are: .*needle_depth"):
        get_task("text_needle", depth=0.5)


@pytest.mark.parametrize(
    "kwargs", [{"n_samples": 0}, {"needle_depth": 1.5}, {"num_images": -1}, {"max_new_tokens": 0}, {"seed": "a"}]
)
def test_bad_field_values_raise(kwargs):
    with pytest.raises(ValueError):
        get_task("text_needle", **kwargs)


@pytest.mark.parametrize("name", ["text_needle", "multi_fact", "fidelity"])
def test_samples_are_deterministic_from_the_seed(name):
    a = get_task(name, n_samples=3, seed=7).samples()
    b = get_task(name, n_samples=3, seed=7).samples()
    c = get_task(name, n_samples=3, seed=8).samples()
    assert _fingerprint(a) == _fingerprint(b)
    assert [s.content[0] for s in a] != [s.content[0] for s in c]
    assert len({s.id for s in a}) == 3
    # a longer task starts with the same samples
    assert _fingerprint(get_task(name, n_samples=4, seed=7).samples()[:3]) == _fingerprint(a)


def test_text_needle_layout_and_answer():
    task = get_task("text_needle", n_samples=6, num_images=3, context_tokens=600)
    for s in task.samples():
        text = " ".join(s.texts)
        assert s.num_images == 3 and all(isinstance(im, Image.Image) and im.size == (224, 224) for im in s.images)
        assert isinstance(s.content[-1], str) and s.meta["name"] in s.content[-1]
        assert text.count(s.meta["needle"]) == 1
        assert re.findall(r"\d+", text) == [s.answer]  # the code is the only number in the prompt
        assert 400 < s.meta["approx_text_tokens"] < 800
        assert s.meta["name"] in FACT_NAMES


def test_needle_depth_places_the_fact():
    first = get_task("text_needle", n_samples=2, needle_depth=0.0, num_images=2).samples()
    last = get_task("text_needle", n_samples=2, needle_depth=1.0, num_images=2).samples()
    for s in first:
        assert s.meta["needle_sentence"] == 0 and s.meta["needle"] in s.content[0]
    for s in last:
        assert s.meta["needle_sentence"] == s.meta["num_sentences"] - 1
        assert s.content[-2].endswith(s.meta["needle"])  # last document sentence, just before the question


def test_insert_at_depths_positions():
    sentences = [f"s{i}." for i in range(10)]
    out, pos = insert_at_depths(sentences, [(0.5, "A."), (0.0, "B."), (1.0, "C."), (0.5, "D.")])
    assert len(out) == 14
    assert [out[p] for p in pos] == ["A.", "B.", "C.", "D."]
    assert pos[1] == 0 and pos[2] == 13 and pos[0] < pos[3]


def test_filler_is_varied_and_has_no_digits_or_fact_phrases():
    import random

    sentences = filler_sentences(random.Random(0), 3000)
    text = " ".join(sentences)
    assert not re.search(r"\d", text)
    assert "secret code" not in text and "postal code" not in text and " lives in " not in text
    assert not any(name in text for name in FACT_NAMES)
    assert len(set(sentences)) > 0.95 * len(sentences)
    assert all(sentences[i] != sentences[i + 1] for i in range(len(sentences) - 1))
    assert len(TEMPLATES) >= 30


def test_text_needle_scoring():
    task = get_task("text_needle", n_samples=1)
    s = task.samples()[0]
    assert task.score(s, f"The secret code of {s.meta['name']} is {s.answer}.") == 1.0
    assert task.score(s, s.answer) == 1.0
    assert task.score(s, "I do not know.") == 0.0
    assert task.score(s, f"1{s.answer}") == 0.0  # inside a longer number
    assert task.score(s, s.answer[:3]) == 0.0


def test_multi_fact_layout_and_scoring():
    task = get_task("multi_fact", n_samples=4, distractors=1, min_separation=0.4)
    for s in task.samples():
        text = " ".join(s.texts)
        assert f"{s.meta['name']} lives in {s.meta['town']}." in text
        assert f"The postal code of {s.meta['town']} is {s.answer}." in text
        assert abs(s.meta["person_depth"] - s.meta["code_depth"]) >= 0.4
        assert sorted(re.findall(r"\d+", text)) == sorted([s.answer, *s.meta["distractor_codes"]])
        assert text.count(s.meta["town"]) == 2  # filler never mentions the fact towns
        wrong = s.meta["distractor_codes"][0]
        assert task.score(s, f"The postal code is {s.answer}.") == 1.0
        assert task.score(s, f"It is {wrong}.") == 0.0
        assert task.score(s, f"{s.answer} or {wrong}") == 0.0  # hedging between codes does not count


def test_multi_fact_fixed_depths():
    s = get_task("multi_fact", n_samples=1, person_depth=0.1, code_depth=0.9).samples()[0]
    i, j = s.meta["fact_sentences"]
    n = s.meta["num_sentences"]
    assert i < 0.2 * n and j > 0.8 * n


def test_fidelity_samples_and_score():
    task = get_task("fidelity", n_samples=2, num_images=1)
    assert task.mode == "fidelity"
    s = task.samples()[0]
    assert s.answer == "" and s.num_images == 1
    with pytest.raises(NotImplementedError, match="runner"):
        task.score(s, "anything")


def test_register_task_decorator():
    from dataclasses import dataclass

    @register_task("_echo_for_test")
    @dataclass
    class Echo(Task):
        def samples(self):
            return [Sample(f"echo-{i}", [f"say {i}"], str(i)) for i in range(self.n_samples)]

        def score(self, sample, prediction):
            return float(sample.answer in prediction)

    try:
        task = get_task("_echo_for_test", n_samples=2)
        assert task.name == "_echo_for_test" and [s.answer for s in task.samples()] == ["0", "1"]
        with pytest.raises(TypeError):
            register_task("_bad")(object)
    finally:
        from kvpress_mm.eval import tasks

        tasks._TASKS.pop("_echo_for_test", None)
