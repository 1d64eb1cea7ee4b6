"""One prefill (timed, with peak memory) and the decode steps that follow it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .memory import peak_memory


@dataclass
class PrefillRun:
    seconds: float
    peak_bytes: int
    cache: DynamicCache
    next_token: torch.Tensor
    length: int
    report: object = None
    session: object = None
    prompt_mask: torch.Tensor | None = None  # [B, L] of a padded batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(bench, inputs: dict, strategy, device: torch.device, eager: bool = False) -> PrefillRun:
    """Prefill `inputs` with `strategy` (None: plain sdpa). eager: the LOOK-M release's way, full
    L x L eager probabilities (the strategy reads its statistics from them)."""
    cache = DynamicCache(config=bench.config)
    model = bench.model
    if eager:
        model.set_attn_implementation("eager")
    try:
        session = strategy(model) if strategy is not None else None
        if session is not None:
            session.__enter__()
        try:
            with peak_memory(device) as peak:
                _sync(device)
                start = time.perf_counter()
                out = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
                _sync(device)
                seconds = time.perf_counter() - start
        finally:
            if session is not None:
                session.__exit__(None, None, None)
    finally:
        if eager:
            model.set_attn_implementation("sdpa")
    next_token = out.logits[:, -1:].argmax(-1)
    return PrefillRun(
        seconds,
        peak["bytes"],
        out.cache,
        next_token,
        inputs["input_ids"].shape[1],
        session.report if session is not None else None,
        session,
        inputs.get("attention_mask"),
    )


@torch.no_grad()
def decode_ms_per_token(bench, run: PrefillRun, steps: int, device: torch.device) -> float:
    """Greedy decode `steps` tokens on the prefilled cache; position ids continue the prompt's."""
    model, cache, token = bench.model, run.cache, run.next_token
    session = run.session
    if session is not None:
        session.__enter__()  # decode masks of the compacted layers come from the session
    try:
        times = []
        batch = token.shape[0]
        prompt_mask = run.prompt_mask
        if prompt_mask is None:
            prompt_mask = torch.ones((batch, run.length), dtype=torch.long, device=device)
        for step in range(steps):
            position = torch.full((batch, 1), run.length + step, device=device)
            mask = torch.cat([prompt_mask, prompt_mask.new_ones((batch, step + 1))], dim=-1)
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=token, cache=cache, position_ids=position, attention_mask=mask, use_cache=True)
            _sync(device)
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
    finally:
        if session is not None:
            session.__exit__(None, None, None)
    times.sort()
    return 1000 * times[len(times) // 2]  # median: robust to the odd slow step
