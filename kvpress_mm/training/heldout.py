"""Held-out check of a projector: single-image questions (colour, shape, digit) on scenes never trained on.

Items are balanced over the answers (every colour / shape / digit in turn) and drawn from the scene seed
HELDOUT_SEED (training uses `scene_stream(seed)` with small seeds: disjoint scene seeds). The model
generates greedily (full 256 image tokens, chat template, as at inference); an answer is correct when it
contains the expected word (case-insensitive, whole word) and no other word of the same type (no other
colour for a colour question, ...).

    python -m kvpress_mm.train_projector --eval-only kvpress_mm/offline/projector.safetensors --heldout 30
"""

from __future__ import annotations

import time

import torch

from kvpress_mm.vision_data import COLORS, DIGITS, SHAPES, exclusive_match, make_scene, scene_seed

HELDOUT_SEED = 777_777
HELDOUT_TYPES = ("colour", "shape", "digit")
QUESTIONS = {
    "colour": "What colour is the {noun}?",
    "shape": "What shape is shown in the image?",
    "digit": "What digit is shown in the image?",
}
VOCABULARY = {"colour": tuple(COLORS), "shape": SHAPES, "digit": DIGITS}


def heldout_items(n_per_type: int = 20, seed: int = HELDOUT_SEED, qtypes=HELDOUT_TYPES) -> list[dict]:
    """[{"id", "qtype", "image", "question", "expected"}]: n_per_type items per question type."""
    items = []
    for t, qtype in enumerate(qtypes):
        for k in range(n_per_type):
            s = scene_seed(seed, t * 100_000 + k)
            if qtype == "colour":
                color = tuple(COLORS)[k % len(COLORS)]
                kind = "single_shape" if k % 2 == 0 else "single_digit"
                scene = make_scene(s, kind, color=color)
                noun = "shape" if kind == "single_shape" else "digit"
                question, expected = QUESTIONS["colour"].format(noun=noun), color
            elif qtype == "shape":
                shape = SHAPES[k % len(SHAPES)]
                scene = make_scene(s, "single_shape", shape=shape)
                question, expected = QUESTIONS["shape"], shape
            elif qtype == "digit":
                digit = DIGITS[k % len(DIGITS)]
                scene = make_scene(s, "single_digit", digit=digit)
                question, expected = QUESTIONS["digit"], digit
            else:
                raise ValueError(f"unknown held-out question type {qtype!r}; known: {HELDOUT_TYPES}")
            items.append(
                {"id": f"{qtype}-{k}", "qtype": qtype, "image": scene.image, "question": question, "expected": expected}
            )
    return items


def score_answer(prediction: str, qtype: str, expected: str) -> bool:
    return exclusive_match(prediction, expected, VOCABULARY[qtype])


def evaluate_heldout(
    model,
    processor,
    items: list[dict] | None = None,
    n_per_type: int = 20,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> dict:
    """{"accuracy", "per_type": {qtype: accuracy}, "n", "seconds", "samples": [...]} for greedy answers."""
    from tqdm.auto import tqdm

    items = items if items is not None else heldout_items(n_per_type)
    t0 = time.time()
    samples = []
    for i in tqdm(range(0, len(items), batch_size), desc="held-out", disable=not progress):
        chunk = items[i : i + batch_size]
        inputs = processor.prepare_inputs([[it["image"], it["question"]] for it in chunk])
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.pad_token_id
            )
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for it, text in zip(chunk, texts):
            text = text.strip()
            samples.append(
                {
                    "id": it["id"],
                    "qtype": it["qtype"],
                    "question": it["question"],
                    "expected": it["expected"],
                    "prediction": text,
                    "correct": score_answer(text, it["qtype"], it["expected"]),
                }
            )
    per_type = {}
    for qtype in dict.fromkeys(s["qtype"] for s in samples):
        rows = [s for s in samples if s["qtype"] == qtype]
        per_type[qtype] = sum(s["correct"] for s in rows) / len(rows)
    return {
        "accuracy": sum(s["correct"] for s in samples) / max(1, len(samples)),
        "per_type": per_type,
        "n": len(samples),
        "seconds": round(time.time() - t0, 1),
        "samples": samples,
    }
