"""`python -m kvpress_mm.train_projector`: train mini_llava's projector, and / or check it on held-out questions.

python -m kvpress_mm.train_projector --steps 500 --seed 0 --heldout 20      # train, save, evaluate
python -m kvpress_mm.train_projector --eval-only kvpress_mm/offline/projector.safetensors --heldout 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .trainer import DEFAULT_KINDS, TrainConfig


def _tokens(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    for v in values:
        if v <= 0 or round(v**0.5) ** 2 != v or 16 % round(v**0.5):
            raise argparse.ArgumentTypeError(f"image token counts must be 256, 64, 16, 4 or 1, not {v}")
    return values


def _weights(text: str) -> dict[str, float]:
    """ "a=1,b=0.5" -> {"a": 1.0, "b": 0.5}"""
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected name=weight pairs, got {part!r}") from None
    return out


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m kvpress_mm.train_projector",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the scenes, questions, order and init")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step (default %(default)s)")
    p.add_argument("--n-images", type=int, default=d.n_images, help="distinct training images (features cached)")
    p.add_argument("--turns", type=int, default=d.turns, help="question/answer turns per image (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument(
        "--image-tokens",
        type=_tokens,
        default=d.image_tokens,
        help="training image token counts, cycled per step (comma list of 256/64/16); "
        "inference always uses 256 (default 256)",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="PROJECTOR",
        help="start from this projector file (e.g. a previous stage) instead of a fresh init",
    )
    p.add_argument(
        "--kinds",
        type=_weights,
        default=None,
        help="scene kinds and weights, e.g. single_shape=0.35,single_digit=0.3,multi=0.25,single_word=0.1",
    )
    p.add_argument(
        "--qtype-weights",
        type=_weights,
        default=None,
        help="question types and weights, e.g. colour=1,shape=1,digit=1,word=0.6,count=0.6,position=0.5,caption=0.4",
    )
    p.add_argument(
        "--align-steps",
        type=int,
        default=0,
        help="warm start: steps mapping object patches onto the LM's word embeddings (align.py); 0 = none",
    )
    p.add_argument("--align-lr", type=float, default=2e-3)
    p.add_argument(
        "--multi-image",
        type=float,
        default=d.multi_image,
        metavar="FRACTION",
        help="fraction of examples that are 2-4 image prompts with a question about one image "
        "(by its label or as the only image of its kind); 0 = single-image only",
    )
    p.add_argument(
        "--multi-filler",
        type=int,
        default=d.multi_filler_tokens,
        metavar="TOKENS",
        help="half of the multi-image prompts get 10..TOKENS filler tokens after each image (0 = none)",
    )
    p.add_argument(
        "--multi-count",
        type=float,
        default=d.multi_count,
        metavar="FRACTION",
        help="share of the multi-image prompts that ask how many of the images show a digit",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        metavar="N",
        help="examples per forward pass, gradients accumulated (same loss, less padding; default: whole batch)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="projector file (default kvpress_mm/offline/projector.safetensors)")
    p.add_argument("--log-dir", default=d.log_dir, help="loss.csv, summary.json, checkpoints (default %(default)s)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="cache root (model, features); default $KVPRESS_MM_CACHE or ~/.cache/kvpress_mm",
    )
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--time-limit", type=float, default=None, help="stop (and save) after this many minutes")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop (and save) after N steps while the learning-rate schedule still spans --steps",
    )
    p.add_argument("--resume", action="store_true", help="continue from <log-dir>/trainer_state.pt")
    p.add_argument(
        "--heldout",
        type=int,
        default=0,
        metavar="N",
        help="after training (or with --eval-only), answer N held-out questions per type (colour, shape, digit)",
    )
    p.add_argument("--eval-only", default=None, metavar="PROJECTOR", help="no training: evaluate this projector file")
    p.add_argument(
        "--average",
        nargs=2,
        default=None,
        metavar=("FIRST", "SECOND"),
        help="no training: write (1 - w) * FIRST + w * SECOND to --out (w = --average-weight)",
    )
    p.add_argument("--average-weight", type=float, default=0.5, metavar="W")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")
    return p


def run_heldout(projector_path, n_per_type: int, cache_dir=None, batch_size: int = 8, progress: bool = True) -> dict:
    from kvpress_mm.offline import load_mini_llava

    from .heldout import evaluate_heldout

    model, processor = load_mini_llava(cache_dir=cache_dir, projector_path=projector_path)
    return evaluate_heldout(model, processor, n_per_type=n_per_type, batch_size=batch_size, progress=progress)


def _print_heldout(res: dict) -> None:
    per = ", ".join(f"{k} {v:.2f}" for k, v in res["per_type"].items())
    print(
        f"[held-out] accuracy {res['accuracy']:.3f} over {res['n']} questions ({per}) in {res['seconds']} s", flush=True
    )
    for s in res["samples"]:
        if not s["correct"]:
            print(f"   wrong {s['id']}: expected {s['expected']!r}, got {s['prediction']!r}")


def _shipped():
    from kvpress_mm.offline import paths

    return paths.SHIPPED_PROJECTOR


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    if args.average:
        from kvpress_mm.offline.mini_llava import read_projector_state

        from .projector import average_projectors, save_llava_projector

        first, second = (read_projector_state(p) for p in args.average)
        out = save_llava_projector(
            average_projectors(first, second, args.average_weight),
            args.out or _shipped(),
            {"average_of": " ".join(args.average), "weight": args.average_weight},
        )
        print(f"[average] wrote {out}", flush=True)
        if not args.heldout:
            return 0
        args.eval_only = str(out)
    if args.eval_only:
        res = run_heldout(args.eval_only, args.heldout or 20, args.cache_dir, args.eval_batch_size, progress)
        _print_heldout(res)
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.log_dir) / "heldout.json").write_text(json.dumps(res, indent=2))
        return 0
    cfg = TrainConfig(
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        n_images=args.n_images,
        turns=args.turns,
        lr=args.lr,
        warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
        image_tokens=args.image_tokens,
        threads=args.threads,
        out=args.out,
        log_dir=args.log_dir,
        cache_dir=args.cache_dir,
        save_every=args.save_every,
        time_limit_minutes=args.time_limit,
        stop_after=args.stop_after,
        resume=args.resume,
        progress=progress,
        kinds=dict(args.kinds or DEFAULT_KINDS),
        init=args.init,
        qtype_weights=args.qtype_weights,
        align_steps=args.align_steps,
        align_lr=args.align_lr,
        multi_image=args.multi_image,
        multi_filler_tokens=args.multi_filler,
        multi_count=args.multi_count,
        micro_batch=args.micro_batch,
    )
    print(f"[train] {' '.join(sys.argv)}", flush=True)
    from .trainer import train

    t0 = time.time()
    summary = train(cfg)
    print(
        f"[train] saved {summary['out']} after {summary['steps_done']} steps; final loss (EMA) "
        f"{summary['final_loss_ema']}; {summary['wall_seconds']} s",
        flush=True,
    )
    if args.heldout:
        res = run_heldout(summary["out"], args.heldout, args.cache_dir, args.eval_batch_size, progress)
        _print_heldout(res)
        summary["heldout"] = {k: v for k, v in res.items() if k != "samples"}
        (Path(args.log_dir) / "heldout.json").write_text(json.dumps(res, indent=2))
        (Path(args.log_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[train] total {time.time() - t0:.0f} s", flush=True)
    return 0
