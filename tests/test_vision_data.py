"""The synthetic scene / question generator (kvpress_mm.vision_data): deterministic, consistent, drawable."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvpress_mm.vision_data import (
    COLORS,
    DIGITS,
    KINDS,
    QTYPES,
    SHAPES,
    WORDS,
    answer_matches,
    caption,
    exclusive_match,
    make_scene,
    questions_for,
    scene_seed,
    scene_stream,
)


def _pixels(scene):
    return np.asarray(scene.image)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_scene(kind):
    a, b = make_scene(7, kind), make_scene(7, kind)
    assert a.image.size == (224, 224) and a.image.mode == "RGB"
    assert np.array_equal(_pixels(a), _pixels(b))
    assert a.objects == b.objects
    c = make_scene(8, kind)
    assert not np.array_equal(_pixels(a), _pixels(c))


def test_stream_is_deterministic_and_mixed():
    s1, s2 = scene_stream(3, 40), scene_stream(3, 40)
    assert [s.seed for s in s1] == [scene_seed(3, i) for i in range(40)]
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(s1, s2))
    kinds = {s.kind for s in s1}
    assert {"single_shape", "single_digit", "multi"} <= kinds
    # different stream seeds give different scenes
    assert scene_seed(3, 5) != scene_seed(4, 5)
    assert not np.array_equal(_pixels(scene_stream(4, 1)[0]), _pixels(s1[0]))


def test_kinds_have_the_right_objects():
    for seed in range(30):
        shape = make_scene(seed, "single_shape")
        assert len(shape.objects) == 1 and shape.objects[0].kind == "shape" and shape.objects[0].shape in SHAPES
        digit = make_scene(seed, "single_digit")
        assert len(digit.objects) == 1 and digit.objects[0].kind == "digit" and digit.objects[0].text in DIGITS
        word = make_scene(seed, "single_word")
        assert word.objects[0].kind == "word" and word.objects[0].text in WORDS
        multi = make_scene(seed, "multi")
        assert 2 <= len(multi.objects) <= 4
        pairs = [(o.color, o.shape) for o in multi.of_kind("shape")]
        assert len(pairs) == len(set(pairs))
        only = make_scene(seed, "shapes", shapes=("circle", "square"))
        assert all(o.kind == "shape" and o.shape in ("circle", "square") for o in only.objects)
        for o in multi.objects + shape.objects + digit.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
            assert o.color in COLORS


def test_objects_do_not_overlap():
    for seed in range(40):
        objs = make_scene(seed, "multi").objects
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]


def test_forced_content_and_drawn_colour():
    for k, color in enumerate(COLORS):
        for shape in ("circle", "square", "star"):
            scene = make_scene(100 + k, "single_shape", color=color, shape=shape)
            obj = scene.objects[0]
            assert (obj.color, obj.shape) == (color, shape)
            cx, cy = (int(v) for v in obj.center)
            assert tuple(_pixels(scene)[cy, cx]) == COLORS[color]  # the centre pixel has the named colour
        digit = make_scene(200 + k, "single_digit", digit=str(k), color=color)
        assert digit.objects[0].text == str(k)
        ink = (_pixels(digit) == np.array(COLORS[color])).all(-1).sum()
        assert ink > 100  # the digit is drawn, in that colour
    # the background is never a palette colour
    for seed in range(20):
        bg = make_scene(seed, "single_shape").background
        assert all(sum(abs(a - b) for a, b in zip(bg, rgb)) > 60 for rgb in COLORS.values())


def test_questions_are_consistent_with_the_scene():
    seen = set()
    for seed in range(60):
        scene = scene_stream(11, 60)[seed]
        qas = questions_for(scene, random.Random(seed))
        assert qas and qas[-1].qtype == "caption" and qas[-1].answer == caption(scene)
        for qa in qas:
            seen.add(qa.qtype)
            assert qa.qtype in QTYPES and qa.question.endswith(("?", "."))
            if qa.qtype == "colour":
                assert qa.answer in COLORS and qa.answer in {o.color for o in scene.objects}
            elif qa.qtype == "shape":
                assert qa.answer in SHAPES and qa.answer in {o.shape for o in scene.objects}
            elif qa.qtype == "digit":
                assert qa.answer in {o.text for o in scene.of_kind("digit")}
            elif qa.qtype == "word":
                assert qa.answer in WORDS
            elif qa.qtype == "count":
                assert int(qa.answer) in (len(scene.objects), len(scene.of_kind("shape")))
            elif qa.qtype == "position":
                assert qa.answer in ("left", "right", "top", "bottom")
    assert {"colour", "shape", "digit", "count", "position", "caption"} <= seen


def test_single_scene_questions_and_captions():
    scene = make_scene(5, "single_shape", color="red", shape="circle")
    qas = {qa.qtype: qa for qa in questions_for(scene, random.Random(0))}
    assert qas["colour"].answer == "red" and qas["shape"].answer == "circle"
    assert "red circle" in caption(scene)
    digit = make_scene(6, "single_digit", digit="7", color="blue")
    qas = {qa.qtype: qa for qa in questions_for(digit, random.Random(0))}
    assert qas["digit"].answer == "7" and qas["colour"].answer == "blue"
    assert caption(digit) == "The digit 7 written in blue."
    # a question restricted to types
    only = questions_for(scene, random.Random(0), qtypes=("shape",))
    assert [q.qtype for q in only] == ["shape"]


def test_answer_matching():
    assert answer_matches("Red.", "red") and answer_matches("The shape is red", "red")
    assert not answer_matches("reddish", "red") and not answer_matches("bored", "red")
    assert answer_matches("seven", "7") and answer_matches("It is 7.", "7") and not answer_matches("17", "7")
    assert exclusive_match("blue", "blue", COLORS)
    assert not exclusive_match("blue or red", "blue", COLORS)
    assert not exclusive_match("green", "blue", COLORS)


def test_multi_image_questions():
    from kvpress_mm.vision_data import multi

    shape = make_scene(11, "single_shape", shape="star", color="red")
    digit = make_scene(12, "single_digit", digit="7", color="blue")
    assert multi.index_label(1) == ("Image 2:", "Image 2")
    assert multi.name_label("Marta") == ("Marta's picture:", "Marta's picture")
    qas = {q.qtype: q for q in multi.label_questions(shape, "Image 2")}
    assert set(qas) == {"colour", "shape"} and qas["colour"].answer == "red" and qas["shape"].answer == "star"
    assert "Image 2" in qas["shape"].question
    qas = {q.qtype: q for q in multi.label_questions(digit, "Marta's picture")}
    assert qas["digit"].answer == "7" and qas["colour"].question == "What colour is the digit in Marta's picture?"
    assert multi.unique_kind(shape) == "star" and multi.unique_kind(digit) == "digit"
    assert [q.answer for q in multi.unique_questions(shape, "star")] == ["red"]
    assert {q.answer for q in multi.unique_questions(shape, "shape")} == {"star", "red"}
    assert {q.answer for q in multi.unique_questions(digit, "digit")} == {"7", "blue"}
    assert multi.fits_haystack(digit, "shape") and not multi.fits_haystack(shape, "star")
    assert multi.fits_haystack(make_scene(13, "single_shape", shape="circle"), "star")
    with pytest.raises(ValueError):
        multi.object_of(make_scene(3, "multi", n_objects=3))
