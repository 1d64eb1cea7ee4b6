"""Peak memory of a code region: RSS high-water mark on CPU, max allocated on CUDA."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from contextlib import contextmanager
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_field(name: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{name} not found in {_STATUS}")


def _trim_heap() -> None:
    """Hand glibc's cached free blocks back to the OS, so the RSS at entry is what is really in use."""
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def rss_peak_supported() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "bytes" is, after the block, the peak memory above the level at entry."""
    result = {"bytes": 0}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - start
        return
    _trim_heap()
    # writing 5 to clear_refs resets the RSS high-water mark (VmHWM) of this process (Linux >= 4.0)
    _CLEAR_REFS.write_text("5")
    start = _rss_field("VmRSS")
    yield result
    result["bytes"] = max(0, _rss_field("VmHWM") - start)
