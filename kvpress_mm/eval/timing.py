"""Prefill and decode timings of one `generate` call, from hooks on the top-level model's forward.

generate calls the model once for the prefill (the whole prompt; compression happens inside that call) and
once per further token. prefill_seconds = duration of the first call; decode_seconds = from the end of the
first call to the end of the last one (model calls plus generate's per-step work); decode_steps = calls - 1.
"""

from __future__ import annotations

import time

import torch


class ForwardTimer:
    def __init__(self, model: torch.nn.Module, device: torch.device | str | None = None):
        self.model = model
        self.cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
        self.starts: list[float] = []
        self.ends: list[float] = []
        self._handles: list = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args):
        self.starts.append(self._now())

    def _post(self, module, args, output):
        self.ends.append(self._now())

    def __enter__(self) -> ForwardTimer:
        self._handles = [self.model.register_forward_pre_hook(self._pre), self.model.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def calls(self) -> int:
        return len(self.ends)

    @property
    def prefill_seconds(self) -> float:
        return self.ends[0] - self.starts[0] if self.ends else 0.0

    @property
    def decode_steps(self) -> int:
        return max(0, self.calls - 1)

    @property
    def decode_seconds(self) -> float:
        return self.ends[-1] - self.ends[0] if self.calls > 1 else 0.0
