"""The image-grounded long-context tasks: image_needle, image_counting, image_in_text (no model needed)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

import kvpress_mm.eval.tasks.image_counting  # noqa: F401  (registers the task)
import kvpress_mm.eval.tasks.image_in_text  # noqa: F401
import kvpress_mm.eval.tasks.image_needle  # noqa: F401
from kvpress_mm.eval import Sample, get_task, list_tasks
from kvpress_mm.eval.tasks.image_common import image_index_in, numbers_in
from kvpress_mm.vision_data import COLORS, SHAPES

TASKS = ("image_needle", "image_counting", "image_in_text")


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


def test_image_needle():
    task = get_task("image_needle", n_samples=10, num_images=5, needle="digit")
    for s in task.samples():
        assert s.num_images == 5 and s.answer.isdigit() and len(s.answer) == 1
        labels = [c for c in s.content if isinstance(c, str) and re.fullmatch(r"Image \d+:", c)]
        assert labels == [f"Image {k}:" for k in range(1, 6)]
        # the needle image has a big single-coloured digit; the haystack images have no text
        assert 1 <= s.meta["needle_image"] <= 5
    s = task.samples()[0]
    assert task.score(s, f"The digit is {s.answer}.") == 1.0
    assert task.score(s, f"Image {s.meta['needle_image']} shows the digit {s.answer}.") == 1.0
    wrong = str((int(s.answer) + 1) % 10)
    assert task.score(s, wrong) == 0.0 and task.score(s, f"{s.answer} or {wrong}") == 0.0
    assert task.score(s, "I cannot tell.") == 0.0
    star = get_task("image_needle", n_samples=3, needle="star")
    for s in star.samples():
        assert s.answer in COLORS and "star" in s.content[-1]
        assert star.score(s, s.answer.capitalize() + ".") == 1.0
    index = get_task("image_needle", n_samples=3, ask="index", num_images=4)
    for s in index.samples():
        assert s.answer == str(s.meta["needle_image"])
        assert index.score(s, f"Image {s.answer}") == 1.0
    long = get_task("image_needle", n_samples=2, context_tokens=400, num_images=5).samples()
    assert all(300 <= s.meta["approx_text_tokens"] <= 600 for s in long)
    with pytest.raises(ValueError):
        get_task("image_needle", needle="cat")


def test_needle_image_differs_from_haystack():
    s = get_task("image_needle", n_samples=1, num_images=4, seed=1, needle="digit").samples()[0]
    for k, img in enumerate(s.images):
        px = np.asarray(img).reshape(-1, 3)
        colours = {tuple(c) for c in px[::7]}
        if k + 1 == s.meta["needle_image"]:
            assert len(colours) > 8  # anti-aliased text: many intermediate colours
        else:
            assert len(colours) <= 4  # background + up to three flat shapes


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
    assert task.score(task.samples()[0], f"{['zero', 'one', 'two', 'three', 'four'][int(task.samples()[0].answer)]}") == 1.0
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
