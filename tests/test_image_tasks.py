"""The image-grounded long-context tasks (no model needed).

image_needle, image_lookup, image_counting, image_in_text.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

import kvpress_mm.eval.tasks.image_counting  # noqa: F401  (registers the task)
import kvpress_mm.eval.tasks.image_in_text  # noqa: F401
import kvpress_mm.eval.tasks.image_lookup  # noqa: F401
import kvpress_mm.eval.tasks.image_needle  # noqa: F401
from kvpress_mm.eval import Sample, get_task, list_tasks
from kvpress_mm.eval.tasks.image_common import image_index_in, numbers_in
from kvpress_mm.vision_data import COLORS, SHAPES, multi

TASKS = ("image_needle", "image_lookup", "image_counting", "image_in_text")


def _same(a: list[Sample], b: list[Sample]) -> bool:
    for x, y in zip(a, b):
        if x.id != y.id or x.answer != y.answer or len(x.content) != len(y.content):
            return False
        for c, d in zip(x.content, y.content):
            if isinstance(c, Image.Image):
                if not (isinstance(d, Image.Image) and c.tobytes() == d.tobytes()):
                    return False
            elif c != d:
                return False
    return len(a) == len(b)


@pytest.mark.parametrize("name", TASKS)
def test_registered_and_deterministic(name):
    assert name in list_tasks()
    task = get_task(name, n_samples=4, seed=3)
    a, b = task.samples(), get_task(name, n_samples=4, seed=3).samples()
    assert _same(a, b)
    assert not _same(a, get_task(name, n_samples=4, seed=4).samples())
    assert len({s.id for s in a}) == 4
    for s in a:
        assert isinstance(s.content[-1], str) and s.content[-1].endswith((".", "?"))
        assert all(isinstance(c, (str, Image.Image)) for c in s.content)
        assert all(im.size == (224, 224) for im in s.images)
        assert task.score(s, s.answer) == 1.0  # the bare answer is correct
    with pytest.raises(ValueError):
        get_task(name, no_such_field=1)


def _labels(s: Sample) -> list[str]:
    return [c for c, d in zip(s.content, s.content[1:]) if isinstance(c, str) and isinstance(d, Image.Image)]


def _objects(img: Image.Image) -> set:
    """The palette colours drawn in an image (flat fills: exact RGB values)."""
    px = {tuple(c) for c in np.asarray(img).reshape(-1, 3)[::3]}
    return {name for name, rgb in COLORS.items() if rgb in px}


def test_image_needle():
    task = get_task("image_needle", n_samples=10, num_images=5, needle="digit")
    for s in task.samples():
        assert s.num_images == 5 and s.answer.isdigit() and len(s.answer) == 1
        assert _labels(s) == [f"Image {k}:" for k in range(1, 6)]
        assert s.content[0] == multi.INTRO and s.content[-1] == "One of the images shows a digit. Which digit is it?"
        assert 1 <= s.meta["needle_image"] <= 5
        # one colour per image: the needle's colour is nowhere else
        colours = [_objects(img) for img in s.images]
        assert all(len(c) == 1 for c in colours) and len(set.union(*colours)) == 5
    s = task.samples()[0]
    assert task.score(s, f"The digit is {s.answer}.") == 1.0
    assert task.score(s, f"Image {s.meta['needle_image']} shows the digit {s.answer}.") == 1.0
    wrong = str((int(s.answer) + 1) % 10)
    assert task.score(s, wrong) == 0.0 and task.score(s, f"{s.answer} or {wrong}") == 0.0
    assert task.score(s, "I cannot tell.") == 0.0
    shape = get_task("image_needle", n_samples=6)
    assert (shape.num_images, shape.needle, shape.ask) == (3, "shape", "content")
    for s in shape.samples():
        assert s.answer in SHAPES and s.content[-1] == "One of the images shows a shape. Which shape is it?"
        assert shape.score(s, s.answer.capitalize() + ".") == 1.0
        assert shape.score(s, f"{s.answer} and {next(x for x in SHAPES if x != s.answer)}") == 0.0
        assert 700 <= s.meta["approx_text_tokens"] + 256 * 3 <= 1200
    star = get_task("image_needle", n_samples=3, needle="star")
    for s in star.samples():
        assert s.answer in COLORS and "star" in s.content[-1]
        assert star.score(s, s.answer.capitalize() + ".") == 1.0
    colour = get_task("image_needle", n_samples=3, needle="shape", ask="colour")
    assert all(s.answer in COLORS and s.content[-1].endswith("What colour is the shape?") for s in colour.samples())
    index = get_task("image_needle", n_samples=3, ask="index", num_images=4)
    for s in index.samples():
        assert s.answer == str(s.meta["needle_image"])
        assert index.score(s, f"Image {s.answer}") == 1.0
    long = get_task("image_needle", n_samples=2, context_tokens=400, num_images=5).samples()
    assert all(300 <= s.meta["approx_text_tokens"] <= 600 for s in long)
    with pytest.raises(ValueError):
        get_task("image_needle", needle="cat")
    with pytest.raises(ValueError):
        get_task("image_needle", num_images=9)


def test_needle_image_differs_from_haystack():
    for needle in ("shape", "digit"):
        s = get_task("image_needle", n_samples=1, num_images=4, seed=1, needle=needle).samples()[0]
        for k, img in enumerate(s.images):
            px = np.asarray(img).reshape(-1, 3)
            is_text = len({tuple(c) for c in px[::7]}) > 8  # anti-aliased text: many intermediate colours
            assert is_text == ((k + 1 == s.meta["needle_image"]) == (needle == "digit"))


def test_image_lookup():
    task = get_task("image_lookup", n_samples=8)
    assert (task.num_images, task.cue, task.question) == (3, "name", "mixed")
    for i, s in enumerate(task.samples()):
        assert s.num_images == 3 and s.meta["qtype"] == ("shape", "colour")[i % 2]
        labels = _labels(s)
        assert all(lab.endswith("'s picture:") for lab in labels) and len(set(labels)) == 3
        assert labels[s.meta["target_image"] - 1] == s.meta["label"] + ":"
        assert s.meta["label"] in s.content[-1]
        assert s.answer not in s.meta["others"] and len(set(s.meta["others"])) == 2
        assert task.score(s, f"It is {s.answer}.") == 1.0
        assert task.score(s, s.meta["others"][0]) == 0.0
        assert task.score(s, f"{s.answer} or {s.meta['others'][0]}") == 0.0
        assert 700 <= s.meta["approx_text_tokens"] + 256 * 3 <= 1200
        # the filler never names a palette colour or a shape
        doc = " ".join(c for c in s.content[:-1] if isinstance(c, str))
        assert not re.search(r"\b(" + "|".join(list(COLORS) + list(SHAPES)) + r")s?\b", doc, re.IGNORECASE)
    index = get_task("image_lookup", n_samples=4, cue="index", question="digit", num_images=5, context_tokens=0)
    for s in index.samples():
        assert _labels(s) == [f"Image {k}:" for k in range(1, 6)] and s.answer.isdigit()
        assert s.content[-1] == f"What digit is shown in Image {s.meta['target_image']}?"
        assert index.score(s, f"The digit is {s.answer}") == 1.0 and index.score(s, s.meta["others"][0]) == 0.0
    last = get_task("image_lookup", n_samples=3, target_position=1.0).samples()
    assert all(s.meta["target_image"] == 3 for s in last)
    with pytest.raises(ValueError):
        get_task("image_lookup", num_images=5)  # only four distinct shapes
    with pytest.raises(ValueError):
        get_task("image_lookup", cue="colour")


def test_image_counting():
    task = get_task("image_counting", n_samples=12, num_images=4)
    counts = []
    for s in task.samples():
        assert s.num_images == 4
        n = int(s.answer)
        assert 1 <= n <= 4 and len(s.meta["hit_images"]) == n
        counts.append(n)
        assert task.score(s, f"There are {n} images.") == 1.0
        assert task.score(s, f"Image 4 and image 1: {n}") == 1.0
        assert task.score(s, f"{n + 1}") == 0.0
    assert len(set(counts)) >= 3
    assert (
        task.score(task.samples()[0], f"{['zero', 'one', 'two', 'three', 'four'][int(task.samples()[0].answer)]}")
        == 1.0
    )
    red = get_task("image_counting", n_samples=4, target="red", num_images=3, min_count=0, max_count=2)
    for s in red.samples():
        assert 0 <= int(s.answer) <= 2 and "red shape" in s.content[-1]
    with pytest.raises(ValueError):
        get_task("image_counting", num_images=2, max_count=3)
    with pytest.raises(ValueError):
        get_task("image_counting", target="pink")


def test_image_in_text():
    task = get_task("image_in_text", n_samples=9, context_tokens=600)
    banned = re.compile(r"\b(" + "|".join(list(COLORS) + list(SHAPES)) + r")s?\b", re.IGNORECASE)
    for i, s in enumerate(task.samples()):
        assert s.num_images == 1
        assert s.meta["qtype"] == ("colour", "shape", "digit")[i % 3]
        assert 500 <= s.meta["approx_text_tokens"] <= 750
        # the filler never names a colour or a shape (the image alone answers the question)
        doc = " ".join(c for c in s.content[:-1] if isinstance(c, str))
        assert not banned.search(doc)
        assert task.score(s, s.answer) == 1.0
    colour = [s for s in task.samples() if s.meta["qtype"] == "colour"][0]
    other = next(c for c in COLORS if c != colour.answer)
    assert task.score(colour, f"It is {colour.answer}.") == 1.0
    assert task.score(colour, f"{colour.answer} and {other}") == 0.0
    depth0 = get_task("image_in_text", n_samples=1, image_depth=0.0).samples()[0]
    assert isinstance(depth0.content[1], Image.Image) and depth0.content[0].startswith("Read the following")
    no_text = get_task("image_in_text", n_samples=1, context_tokens=0).samples()[0]
    assert len(no_text.content) == 3


def test_answer_parsing():
    assert numbers_in("Image 3 shows the digit 7") == [7]
    assert numbers_in("There are two.") == [2]
    assert numbers_in("3 images, the 2nd one") == [3, 2]
    assert image_index_in("It is image number 4.") == 4 and image_index_in("the second image") == 2
    assert image_index_in("No idea") is None
