"""Training examples: one image + a few question / answer turns, chat-formatted exactly like inference.

The first user turn is `[image, question]`, i.e. the prompt `MiniLlavaProcessor` renders for
`processor.prepare_inputs([image, question])` (image placeholder, "\\n", question). Later turns ask more
questions about the same image (the image's tokens are paid for once, several answers supervised). Labels
cover each answer and its `<|im_end|>` only; everything else is -100.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kvpress_mm.vision_data import QA, Scene, questions_for

IGNORE = -100

# how likely each question type is to be asked about an image (when applicable)
DEFAULT_QTYPE_WEIGHTS = {"colour": 1.0, "shape": 1.0, "digit": 1.0, "word": 0.6, "count": 0.6,
                         "position": 0.5, "caption": 0.4}


@dataclass
class Example:
    input_ids: list[int]      # image placeholder already expanded to `image_tokens` ids
    labels: list[int]
    weights: list[float]      # per label token: 1 / (tokens of its answer), so each answer counts once
    image_index: int
    qas: list[QA]


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

    def messages(self, qas: list[QA]) -> list[dict]:
        sep = self.processor.separator
        out = []
        for k, qa in enumerate(qas):
            content = f"{self.image_token}{sep}{qa.question}" if k == 0 else qa.question
            out.append({"role": "user", "content": content})
            out.append({"role": "assistant", "content": qa.answer})
        return out

    def build(self, qas: list[QA], image_index: int, image_tokens: int) -> Example:
        msgs = self.messages(qas)
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
            if full[len(prompt): len(prompt) + len(answer)] != answer:
                raise ValueError(f"unexpected rendering of the answer {answer!r} in {full[len(prompt):][:60]!r}")
            pieces.append((full[pos:len(prompt)], False))
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
        if n_images != 1:
            raise ValueError(f"expected one image placeholder, found {n_images}")
        return Example(ids, labels, weights, image_index, list(qas))


def collate(examples: list[Example], features: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, weights [B, L]; image_features [B, T, D] (float32).

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
    image_features = torch.stack([features[e.image_index] for e in examples]).float()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weights": weights,
            "image_features": image_features}
