"""Training examples: one image + a few question / answer turns, chat-formatted exactly like inference.

The first user turn is `[image, question]`, i.e. the prompt `MiniLlavaProcessor` renders for
`processor.prepare_inputs([image, question])` (image placeholder, "\\n", question). Later turns ask more
questions about the same image (the image's tokens are paid for once, several answers supervised). Labels
cover each answer and its `<|im_end|>` only; everything else is -100.

Multi-image examples (`multi_image_episode`, trainer `multi_image` > 0): the first user turn is the multi-image
prompt of the tasks (`vision_data.multi`: intro, "Image k:" / "<name>'s picture:" labels, 2-4 single-object
images, optional filler text after each image, a question about one image or a count); later turns ask about the
others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kvpress_mm.vision_data import QA, Scene, multi, questions_for

IGNORE = -100

# how likely each question type is to be asked about an image (when applicable)
DEFAULT_QTYPE_WEIGHTS = {
    "colour": 1.0,
    "shape": 1.0,
    "digit": 1.0,
    "word": 0.6,
    "count": 0.6,
    "position": 0.5,
    "caption": 0.4,
}


@dataclass
class Example:
    input_ids: list[int]  # image placeholder already expanded to `image_tokens` ids
    labels: list[int]
    weights: list[float]  # per label token: 1 / (tokens of its answer), so each answer counts once
    image_index: int | list[int]  # row(s) of the batch's feature tensor, one per image in prompt order
    qas: list[QA]

    @property
    def image_indices(self) -> list[int]:
        return list(self.image_index) if isinstance(self.image_index, (list, tuple)) else [self.image_index]


def pick_qas(scene: Scene, rng: random.Random, max_turns: int, weights: dict[str, float] | None = None) -> list[QA]:
    """Up to max_turns QAs about the scene, question types drawn without replacement by weight."""
    weights = weights or DEFAULT_QTYPE_WEIGHTS
    pool = [qa for qa in questions_for(scene, rng) if weights.get(qa.qtype, 0) > 0]
    out = []
    while pool and len(out) < max_turns:
        qa = rng.choices(pool, [weights[q.qtype] for q in pool])[0]
        pool.remove(qa)
        out.append(qa)
    return out


class ExampleBuilder:
    """Tokenises conversations with the processor's tokenizer / chat template."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id

    def messages(self, qas: list[QA], segments: list | None = None) -> list[dict]:
        """Chat messages; the first user turn is `segments` (strings, and None for each image; default: one
        image) followed by the first question, joined as the processor joins a list of segments."""
        sep = self.processor.separator
        segments = [None] if segments is None else segments
        first = sep.join([self.image_token if seg is None else seg for seg in segments] + [qas[0].question])
        out = []
        for k, qa in enumerate(qas):
            content = first if k == 0 else qa.question
            out.append({"role": "user", "content": content})
            out.append({"role": "assistant", "content": qa.answer})
        return out

    def build(
        self, qas: list[QA], image_index: int | list[int], image_tokens: int, segments: list | None = None
    ) -> Example:
        msgs = self.messages(qas, segments)
        tpl = self.tokenizer.apply_chat_template
        full = tpl(msgs, tokenize=False, add_generation_prompt=False)
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for k, qa in enumerate(qas):
            prompt = tpl(msgs[: 2 * k + 1], tokenize=False, add_generation_prompt=True)
            if not full.startswith(prompt) or len(prompt) < pos:
                raise ValueError("the chat template does not render turns as prefixes")
            end_token = self.tokenizer.eos_token or "<|im_end|>"
            answer = qa.answer + end_token
            if full[len(prompt) : len(prompt) + len(answer)] != answer:
                raise ValueError(f"unexpected rendering of the answer {answer!r} in {full[len(prompt) :][:60]!r}")
            pieces.append((full[pos : len(prompt)], False))
            pieces.append((answer, True))
            pos = len(prompt) + len(answer)
        if pos < len(full):
            pieces.append((full[pos:], False))
        ids: list[int] = []
        labels: list[int] = []
        weights: list[float] = []
        n_images = 0
        for text, supervised in pieces:
            toks = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for t in toks:
                if t == self.image_token_id:
                    if supervised:
                        raise ValueError("an image token inside an answer")
                    n_images += 1
                    ids.extend([t] * image_tokens)
                    labels.extend([IGNORE] * image_tokens)
                    weights.extend([0.0] * image_tokens)
                else:
                    ids.append(t)
                    labels.append(t if supervised else IGNORE)
                    weights.append(1.0 / len(toks) if supervised else 0.0)
        expected = len(image_index) if isinstance(image_index, (list, tuple)) else 1
        if n_images != expected:
            raise ValueError(f"expected {expected} image placeholder(s), found {n_images}")
        return Example(ids, labels, weights, image_index, list(qas))


def single_object_pools(scenes: list[Scene]) -> dict[str, list[int]]:
    """Indices of the single-object scenes (shapes and digits) by `multi.unique_kind`, and "all" of them."""
    pools: dict[str, list[int]] = {"all": [], "digit": [], "shape": [], "star": []}
    for i, s in enumerate(scenes):
        if len(s.objects) == 1 and s.objects[0].kind in ("shape", "digit"):
            pools["all"].append(i)
            pools[multi.unique_kind(s)].append(i)
    return pools


def multi_image_episode(
    scenes: list[Scene],
    target: int,
    pools: dict[str, list[int]],
    rng: random.Random,
    max_turns: int,
    filler=None,
    max_filler_tokens: int = 0,
    weights: dict[str, float] | None = None,
    count_share: float = 0.0,
) -> tuple[list, list[int], list[QA]] | None:
    """(segments, image indices, QAs) of a 2-4 image prompt about scene `target`, or None when `target` is not a
    single-object scene. segments: strings, None where an image goes (the images in `image indices` order).

    A `count_share` of the episodes ask how many of the images show a digit (digits among shapes, `target`
    one of them). Of the others, half identify the target by its label ("Image k" or a name), half by its kind
    (the only digit / shape / star: the other images are drawn from the scenes of another kind).
    `filler(rng, tokens)` gives the text put after an image (with probability 1/2 per episode,
    10..max_filler_tokens tokens each). Follow-up turns ask about the other images by their label."""
    scene = scenes[target]
    if len(scene.objects) != 1 or scene.objects[0].kind not in ("shape", "digit"):
        return None
    n = rng.randint(2, 4)
    if count_share and rng.random() < count_share:
        return _count_episode(scenes, target, pools, rng, n, max_turns, filler, max_filler_tokens, weights)
    by_kind = rng.random() < 0.5
    kind = multi.unique_kind(scene)
    if by_kind:
        if kind == "star" and rng.random() < 0.4:
            kind = "shape"  # the star as the only shape among digits
        others = [
            i
            for i in (
                pools["shape"] + pools["star"]
                if kind == "digit"
                else pools["digit"]
                if kind == "shape"
                else pools["shape"]
            )
            if i != target
        ]
    else:
        others = [i for i in pools["all"] if i != target]
    if len(others) < n - 1:
        return None
    pos = rng.randrange(n)
    indices = rng.sample(others, n - 1)
    indices.insert(pos, target)
    names = rng.sample(multi.LABEL_NAMES, n)
    use_names = not by_kind and rng.random() < 0.5
    labels = [multi.name_label(names[k]) if use_names else multi.index_label(k) for k in range(n)]
    segments = _segments(labels, rng, filler, max_filler_tokens)
    first = _pick(
        multi.unique_questions(scene, kind) if by_kind else multi.label_questions(scene, labels[pos][1]), rng, weights
    )
    return segments, indices, [first] + _follow_ups(scenes, indices, labels, [pos], rng, max_turns, weights)


def _count_episode(scenes, target, pools, rng, n, max_turns, filler, max_filler_tokens, weights):
    """n images, 1..n of them digits (the target among them when it is a digit, else among the shapes)."""
    is_digit = scenes[target].objects[0].kind == "digit"
    count = rng.randint(1, n) if is_digit else rng.randint(1, n - 1)
    digits = [i for i in pools["digit"] if i != target]
    shapes = [i for i in pools["shape"] + pools["star"] if i != target]
    hits, misses = count - int(is_digit), n - count - int(not is_digit)
    if len(digits) < hits or len(shapes) < misses:
        return None
    indices = rng.sample(digits, hits) + rng.sample(shapes, misses) + [target]
    rng.shuffle(indices)
    labels = [multi.index_label(k) for k in range(n)]
    segments = _segments(labels, rng, filler, max_filler_tokens)
    first = QA(multi.count_question("a digit"), str(count), "count", str(count))
    return segments, indices, [first] + _follow_ups(scenes, indices, labels, [], rng, max_turns, weights)


def _segments(labels, rng, filler, max_filler_tokens) -> list:
    with_text = filler is not None and max_filler_tokens >= 10 and rng.random() < 0.5
    segments: list = [multi.INTRO]
    for label, _ in labels:
        segments += [label, None]
        if with_text:
            segments.append(filler(rng, rng.randint(10, max_filler_tokens)))
    return segments


def _pick(qas: list[QA], rng: random.Random, weights: dict[str, float] | None) -> QA:
    w = weights or {}
    return rng.choices(qas, [w.get(q.qtype, 1.0) or 1e-6 for q in qas])[0]


def _follow_ups(scenes, indices, labels, asked, rng, max_turns, weights) -> list[QA]:
    """Questions about the images not asked about yet, by their label, until max_turns QAs in all."""
    rest = [k for k in range(len(indices)) if k not in asked]
    rng.shuffle(rest)
    budget = max(0, max_turns - 1)
    return [_pick(multi.label_questions(scenes[indices[k]], labels[k][1]), rng, weights) for k in rest[:budget]]


def collate(examples: list[Example], features: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, weights [B, L]; image_features [N, T, D] (float32,
    the images of all examples in order: N = B for single-image examples).

    `features` are the cached [N, T, D] features already at the training token count.
    """
    width = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    weights = torch.zeros((b, width), dtype=torch.float32)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
        weights[i, :n] = torch.tensor(e.weights)
    image_features = features[[i for e in examples for i in e.image_indices]].float()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "weights": weights,
        "image_features": image_features,
    }
