"""Peak memory of a block of code: CUDA allocator peak on GPUs, resident-set (RSS) peak on CPU.

On Linux CPU the kernel's high-water mark VmHWM is reset by writing "5" to /proc/self/clear_refs, and read
back from /proc/self/status after the block. Where that is not allowed, a thread samples VmRSS every
few milliseconds instead (may miss short spikes). RSS counts the whole process (weights included), so the
increase over the RSS at the start of the block is reported too.
"""

from __future__ import annotations

import re
import threading
import time

import torch

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """with PeakMemory(device) as mem: ...  -> mem.peak_bytes, mem.start_bytes, mem.increase_bytes, mem.method."""

    def __init__(self, device: torch.device | str | None = None, sample_interval: float = 0.005):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.sample_interval = sample_interval
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None
        self.method = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_memory_allocated"
            return self
        self.start_bytes = current_rss_bytes()
        if self.start_bytes is None:
            return self  # not Linux: nothing to read
        if _reset_hwm() and _status_kib("VmHWM") is not None:
            self.method = "rss_vmhwm"
            return self
        self.method = "rss_sampled"
        self._sampled = self.start_bytes
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = current_rss_bytes()
            if rss is not None and rss > self._sampled:
                self._sampled = rss
            time.sleep(self.sample_interval)

    def __exit__(self, *exc) -> None:
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "rss_vmhwm":
            self.peak_bytes = _status_kib("VmHWM") * 1024
        elif self.method == "rss_sampled":
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._sampled, current_rss_bytes() or 0)

    @property
    def increase_bytes(self) -> int | None:
        if self.peak_bytes is None or self.start_bytes is None:
            return None
        return max(0, self.peak_bytes - self.start_bytes)
