"""Optional warm start of the projector: map object patches onto the LM's word embeddings (no LM forward).

Next-token cross-entropy through the frozen 30-layer LM is expensive on a CPU (seconds per step), and the
LM only slowly discovers what the projected tokens mean. This stage gives the projector a head start from the
same cached features: a patch token covered by an object is regressed onto the sum of the LM's input
embeddings of the words that name it ("red" + "circle", "blue" + "7", "green" + "cat"), rescaled to the
norm of an embedding row; a background patch onto the mean embedding (a token without meaning). It trains
the projector only (MSE, cheap: no language model). The cross-entropy stage then takes over.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from kvpress_mm.vision_data import COLORS

PATCH = 14


def patch_labels(scene, grid: int = 16, min_shape: float = 0.25, min_text: float = 0.06) -> list[int]:
    """For each patch (row-major): the index of the object covering it, or -1 (background).

    Coverage = fraction of the patch's pixels that have exactly the object's colour (inside its box)."""
    px = np.asarray(scene.image)
    size = PATCH
    out = []
    for r in range(grid):
        for c in range(grid):
            best, best_frac = -1, 0.0
            y0, x0 = r * size, c * size
            for k, obj in enumerate(scene.objects):
                bx0, by0, bx1, by1 = obj.box
                if bx1 <= x0 or bx0 >= x0 + size or by1 <= y0 or by0 >= y0 + size:
                    continue
                region = px[y0 : y0 + size, x0 : x0 + size]
                frac = float((region == np.array(COLORS[obj.color])).all(-1).mean())
                if frac >= (min_shape if obj.kind == "shape" else min_text) and frac > best_frac:
                    best, best_frac = k, frac
            out.append(best)
    return out


def _word_vector(tokenizer, emb: torch.Tensor, word: str) -> torch.Tensor:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return emb[ids].mean(0)


def alignment_targets(
    scenes, tokenizer, emb: torch.Tensor, background_fraction: float = 0.15, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [M, 2] = (image, patch), targets [M, H]) for the object patches of `scenes` and a random
    `background_fraction` of the background patches."""
    rng = random.Random(f"align:{seed}")
    norm = float(emb.norm(dim=1).mean())
    mean = emb.mean(0)
    background = mean / mean.norm() * norm
    cache: dict[str, torch.Tensor] = {}

    def vec(word):
        if word not in cache:
            cache[word] = _word_vector(tokenizer, emb, word)
        return cache[word]

    index, targets = [], []
    for i, scene in enumerate(scenes):
        labels = patch_labels(scene)
        obj_vecs = []
        for obj in scene.objects:
            name = obj.shape if obj.kind == "shape" else obj.text
            v = vec(obj.color) + vec(name)
            obj_vecs.append(v / v.norm() * norm)
        for p, lab in enumerate(labels):
            if lab >= 0:
                index.append((i, p))
                targets.append(obj_vecs[lab])
            elif rng.random() < background_fraction:
                index.append((i, p))
                targets.append(background)
    return torch.tensor(index, dtype=torch.long), torch.stack(targets).float()


def align_projector(
    projector,
    features: torch.Tensor,
    scenes,
    tokenizer,
    emb: torch.Tensor,
    steps: int = 300,
    batch_tokens: int = 2048,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train `projector` (in place) to map object patches onto word embeddings; returns the loss per step
    (MSE relative to the embedding variance)."""
    from tqdm.auto import tqdm

    index, targets = alignment_targets(scenes, tokenizer, emb.detach().float(), seed=seed)
    var = float(emb.float().var())
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(steps), desc="align projector", disable=not progress, dynamic_ncols=True)
    for step in bar:
        pick = torch.randint(0, index.shape[0], (batch_tokens,), generator=g)
        x = features[index[pick, 0], index[pick, 1]].float()
        y = targets[pick]
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.5 * (1 + np.cos(np.pi * step / steps)) * 0.9 + 0.1)
        loss = torch.nn.functional.mse_loss(projector(x), y) / var
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
