"""Peak-memory and timing helpers of the runner."""

from __future__ import annotations

import time

import torch

from kvpress_mm.eval.memory import PeakMemory, current_rss_bytes
from kvpress_mm.eval.timing import ForwardTimer


def test_peak_memory_sees_a_temporary_allocation():
    if current_rss_bytes() is None:  # not Linux
        return
    with PeakMemory("cpu") as mem:
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        del x
    assert mem.method in ("rss_vmhwm", "rss_sampled")
    assert mem.peak_bytes >= mem.start_bytes > 0
    assert mem.increase_bytes >= 48 * 1024 * 1024
    with PeakMemory("cpu") as small:
        pass
    assert small.increase_bytes < 16 * 1024 * 1024  # the high-water mark was reset


def test_forward_timer_counts_calls():
    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.02 if x.shape[1] > 1 else 0.005)
            return x

    model = Slow()
    with ForwardTimer(model) as timer:
        model(torch.zeros(1, 5))
        for _ in range(3):
            model(torch.zeros(1, 1))
    model(torch.zeros(1, 1))  # hooks are gone
    assert timer.calls == 4 and timer.decode_steps == 3
    assert timer.prefill_seconds >= 0.02 and 0.015 <= timer.decode_seconds < 0.5
