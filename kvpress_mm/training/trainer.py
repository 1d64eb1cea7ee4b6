"""Train ONLY mini_llava's projector (vision tower and language model frozen) on synthetic scenes, on CPU.

Loop: cached tower features (features.py) -> StandardizedProjector -> written into the image positions of
the frozen SmolLM2's input embeddings -> next-token cross-entropy on the answer tokens only (each answer
weighted once, whatever its length). Logs every step to `<log_dir>/loss.csv`, a summary to
`<log_dir>/summary.json`, and checkpoints (the LLaVA projector state dict + the trainer state) every
`save_every` steps so a run can be resumed (`resume=True`).
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import IGNORE, Example, ExampleBuilder, collate, multi_image_episode, pick_qas, single_object_pools
from .features import cached_features, pool_tokens
from .projector import StandardizedProjector, channel_stats, save_llava_projector

DEFAULT_KINDS = {"single_shape": 0.35, "single_digit": 0.3, "multi": 0.25, "single_word": 0.1}


@dataclass
class TrainConfig:
    steps: int = 500
    seed: int = 0
    batch_size: int = 4
    n_images: int = 1024
    turns: int = 4
    lr: float = 1e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    image_tokens: tuple[int, ...] = (256,)  # cycled per step; inference always uses 256
    threads: int | None = None
    out: str | None = None  # default: kvpress_mm/offline/projector.safetensors
    log_dir: str = "runs/projector"
    cache_dir: str | None = None
    save_every: int = 25
    time_limit_minutes: float | None = None  # stop early (and save) when exceeded
    stop_after: int | None = None  # stop (and save) after this many steps; the schedule still uses `steps`
    resume: bool = False
    progress: bool = True
    init: str | None = None  # start from this projector file (a previous stage) instead of a fresh init
    qtype_weights: dict | None = None  # question type -> weight (default data.DEFAULT_QTYPE_WEIGHTS)
    align_steps: int = 0  # warm start (align.py) before the cross-entropy steps; 0 = none
    align_lr: float = 2e-3
    multi_image: float = 0.0  # fraction of examples that are 2-4 image prompts (data.multi_image_episode)
    multi_filler_tokens: int = 0  # up to this much filler text after each image of half the multi-image prompts
    multi_count: float = 0.0  # share of the multi-image prompts that ask how many images show a digit
    micro_batch: int | None = None  # examples per forward (gradients accumulated; None = the whole batch).
    #                                         Same loss; avoids padding long multi-image rows and short rows together
    kinds: dict = field(default_factory=lambda: dict(DEFAULT_KINDS))

    def resolved_out(self) -> Path:
        if self.out:
            return Path(self.out)
        from kvpress_mm.offline import paths

        return paths.SHIPPED_PROJECTOR


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def projector_loss(
    model, projector, batch: dict, image_token_id: int, normaliser: float | None = None
) -> tuple[torch.Tensor, dict]:
    """(loss, stats): the weighted answer cross-entropy of one batch, as LLaVA's forward would compute it with
    these image features (image positions of the input embeddings replaced by the projected features).
    The weighted sum is divided by `normaliser` (default: the batch's total answer weight)."""
    inner = model.model
    lm = inner.language_model
    ids = batch["input_ids"]
    with torch.no_grad():
        emb = lm.embed_tokens(ids)
    img = projector(batch["image_features"])
    mask = (ids == image_token_id).unsqueeze(-1)
    if int(mask.sum()) != img.shape[0] * img.shape[1]:
        raise ValueError(f"{int(mask.sum())} image positions for {img.shape[0] * img.shape[1]} image features")
    emb = emb.masked_scatter(mask, img.to(emb.dtype))
    hidden = lm(inputs_embeds=emb, attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    weights = batch["weights"][:, 1:]
    sel = labels != IGNORE
    logits = model.lm_head(hidden[:, :-1][sel]).float()
    target = labels[sel]
    ce = F.cross_entropy(logits, target, reduction="none")
    w = weights[sel]
    loss = (ce * w).sum() / (w.sum() if normaliser is None else normaliser)
    stats = {
        "token_loss": float(ce.detach().mean()),
        "token_acc": float((logits.detach().argmax(-1) == target).float().mean()),
        "answers": float(w.sum().detach()),
        "targets": int(target.numel()),
        "tokens": int(batch["attention_mask"].sum()),
    }
    return loss, stats


def _freeze(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()


def train(cfg: TrainConfig, model=None, processor=None, log=print) -> dict:
    """Run the training; returns the summary (also written to <log_dir>/summary.json)."""
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    if model is None:
        from kvpress_mm.offline import load_mini_llava

        model, processor = load_mini_llava(cache_dir=cfg.cache_dir)
    _freeze(model)
    log_dir = Path(cfg.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    out = cfg.resolved_out()

    t0 = time.time()
    features, scenes = cached_features(
        model, cfg.seed, cfg.n_images, cfg.kinds, cfg.cache_dir, progress=cfg.progress, log=log
    )
    feature_seconds = time.time() - t0
    mean, std = channel_stats(features)
    projector = StandardizedProjector.like(model.model.multi_modal_projector, mean, std)
    emb_std = float(model.model.language_model.embed_tokens.weight.std())
    projector.init(cfg.seed, out_std=emb_std, sample=features[:8])
    if cfg.init:
        from kvpress_mm.offline.mini_llava import read_projector_state

        projector.load_llava_state_dict(read_projector_state(cfg.init))
    align_losses: list[float] = []
    if cfg.align_steps and not (cfg.resume and (log_dir / "trainer_state.pt").is_file()):
        from .align import align_projector

        t1 = time.time()
        align_losses = align_projector(
            projector,
            features,
            scenes,
            processor.tokenizer,
            model.model.language_model.embed_tokens.weight,
            steps=cfg.align_steps,
            lr=cfg.align_lr,
            seed=cfg.seed,
            progress=cfg.progress,
        )
        log(
            f"[train] alignment warm start: {cfg.align_steps} steps, loss {align_losses[0]:.3f} -> "
            f"{align_losses[-1]:.3f} in {time.time() - t1:.0f} s"
        )
    optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    builder = ExampleBuilder(processor)
    pad_id = processor.pad_token_id if getattr(processor, "pad_token_id", None) is not None else 0

    state_path = log_dir / "trainer_state.pt"
    csv_path = log_dir / "loss.csv"
    start_step = 0
    train_seconds_before = 0.0
    if cfg.resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        projector.load_state_dict(st["projector"])
        optimizer.load_state_dict(st["optimizer"])
        start_step = st["step"]
        train_seconds_before = st.get("train_seconds", 0.0)
        log(f"[train] resumed at step {start_step}")
    elif csv_path.exists():
        csv_path.unlink()
    new_csv = not csv_path.exists()
    csv_file = open(csv_path, "a", newline="")
    writer = csv.writer(csv_file)
    if new_csv:
        writer.writerow(
            ["step", "loss", "loss_ema", "token_loss", "token_acc", "lr", "image_tokens", "tokens", "seconds"]
        )

    def save(step: int, train_seconds: float):
        save_llava_projector(projector.llava_state_dict(), out, {"step": step, "seed": cfg.seed})
        torch.save(
            {
                "projector": projector.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "train_seconds": train_seconds,
                "config": asdict(cfg),
            },
            state_path,
        )

    # a fixed order of images per epoch, drawn from the seed
    order_rng = random.Random(f"order:{cfg.seed}")
    epochs: list[list[int]] = []

    def image_at(k: int) -> int:
        e, i = divmod(k, cfg.n_images)
        while len(epochs) <= e:
            perm = list(range(cfg.n_images))
            order_rng.shuffle(perm)
            epochs.append(perm)
        return epochs[e][i]

    pools = single_object_pools(scenes) if cfg.multi_image else None
    filler = None
    if cfg.multi_image and cfg.multi_filler_tokens:
        from kvpress_mm.eval.tasks.image_common import clean_filler

        def filler(rng, tokens):
            return " ".join(clean_filler(rng, tokens))

    def example_for(k: int, slot: int, tokens: int):
        """(Example, feature rows) of the k-th training example; its images take batch rows slot, slot + 1, ..."""
        idx = image_at(k)
        rng = random.Random(f"qa:{cfg.seed}:{k}")
        if cfg.multi_image and rng.random() < cfg.multi_image:
            episode = multi_image_episode(
                scenes, idx, pools, rng, cfg.turns, filler, cfg.multi_filler_tokens, cfg.qtype_weights, cfg.multi_count
            )
            if episode is not None:
                segments, rows, qas = episode
                return builder.build(qas, list(range(slot, slot + len(rows))), tokens, segments), rows
        qas = pick_qas(scenes[idx], rng, cfg.turns, cfg.qtype_weights)
        return builder.build(qas, slot, tokens), [idx]

    ema = None
    history = []
    t_train = time.time()
    bar = tqdm(
        range(start_step, cfg.steps),
        desc="train projector",
        initial=start_step,
        total=cfg.steps,
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    step = start_step
    stopped_early = False
    for step in bar:
        tokens = cfg.image_tokens[step % len(cfg.image_tokens)]
        examples, rows = [], []
        for j in range(cfg.batch_size):
            example, used = example_for(step * cfg.batch_size + j, len(rows), tokens)
            examples.append(example)
            rows.extend(used)
        feats = pool_tokens(features[rows].float(), tokens)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        micro = cfg.micro_batch or len(examples)
        total_weight = sum(sum(e.weights) for e in examples)
        loss, stats, offset = 0.0, {"token_loss": 0.0, "token_acc": 0.0, "tokens": 0, "targets": 0}, 0
        for a in range(0, len(examples), micro):
            part = examples[a : a + micro]
            n_rows = sum(len(e.image_indices) for e in part)
            renumbered = [
                Example(e.input_ids, e.labels, e.weights, list(range(r, r + len(e.image_indices))), e.qas)
                for e, r in zip(part, _offsets(part))
            ]
            batch = collate(renumbered, feats[offset : offset + n_rows], pad_id)
            offset += n_rows
            part_loss, part_stats = projector_loss(model, projector, batch, builder.image_token_id, total_weight)
            part_loss.backward()
            loss = loss + part_loss.detach()
            t = part_stats["targets"]
            stats["token_loss"] += part_stats["token_loss"] * t
            stats["token_acc"] += part_stats["token_acc"] * t
            stats["targets"] += t
            stats["tokens"] += part_stats["tokens"]
        stats["token_loss"] /= max(1, stats["targets"])
        stats["token_acc"] /= max(1, stats["targets"])
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(projector.parameters(), cfg.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value} at step {step}")
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        elapsed = time.time() - t_train + train_seconds_before
        row = [
            step + 1,
            round(value, 5),
            round(ema, 5),
            round(stats["token_loss"], 5),
            round(stats["token_acc"], 4),
            f"{lr_at(step, cfg):.3g}",
            tokens,
            stats["tokens"],
            round(elapsed, 1),
        ]
        writer.writerow(row)
        csv_file.flush()
        history.append({"step": step + 1, "loss": value, "loss_ema": ema, "token_acc": stats["token_acc"]})
        bar.set_postfix(loss=f"{value:.3f}", ema=f"{ema:.3f}", acc=f"{stats['token_acc']:.2f}")
        if (step + 1) % cfg.save_every == 0:
            save(step + 1, elapsed)
        if cfg.stop_after is not None and step + 1 >= cfg.stop_after:
            stopped_early = step + 1 < cfg.steps
            break
        if cfg.time_limit_minutes and (time.time() - t_start) / 60 > cfg.time_limit_minutes:
            log(f"[train] time limit reached after step {step + 1}")
            stopped_early = True
            break
    bar.close()
    csv_file.close()
    done = step + 1 if cfg.steps > start_step else start_step
    train_seconds = time.time() - t_train + train_seconds_before
    save(done, train_seconds)

    rows = list(csv.DictReader(open(csv_path)))
    summary = {
        "config": asdict(cfg),
        "out": str(out),
        "steps_done": done,
        "stopped_early": stopped_early,
        "feature_seconds": round(feature_seconds, 1),
        "align_loss": [round(align_losses[0], 4), round(align_losses[-1], 4)] if align_losses else None,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "final_loss_ema": float(rows[-1]["loss_ema"]) if rows else None,
        "loss_curve": _curve(rows),
        "projector_bytes": out.stat().st_size,
    }
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _offsets(examples) -> list[int]:
    """The first feature row of each example when their images are stacked in order."""
    out, r = [], 0
    for e in examples:
        out.append(r)
        r += len(e.image_indices)
    return out


def _curve(rows: list[dict], points: int = 12) -> list[dict]:
    """The loss EMA at ~`points` evenly spaced steps (for docs)."""
    if not rows:
        return []
    n = len(rows)
    idx = sorted({min(n - 1, round(i * (n - 1) / (points - 1))) for i in range(points)})
    return [
        {
            "step": int(rows[i]["step"]),
            "loss": float(rows[i]["loss"]),
            "loss_ema": float(rows[i]["loss_ema"]),
            "token_acc": float(rows[i]["token_acc"]),
        }
        for i in idx
    ]
