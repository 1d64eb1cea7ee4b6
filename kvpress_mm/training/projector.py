"""The trainable projector: LLaVA's MLP (linear_1 -> GELU -> linear_2) on per-channel standardised features.

LLaVA feeds the projector the tower's last hidden state *before* DINOv2's final LayerNorm (std ~2.2, a
few outlier channels with std 5-7 and peaks ~30). LLaVA's projector module has no normalisation, so we
train on standardised inputs (x - mean) / std (per channel, statistics of the cached training features)
and fold that affine map into linear_1 when exporting:

    linear_1((x - mu) / sd) = (W / sd) x + (b - W (mu / sd))

The exported state dict is exactly LLaVA's ({linear_1,linear_2}.{weight,bias}); nothing changes at
inference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvpress_mm.offline.mini_llava import PROJECTOR_KEYS


class StandardizedProjector(nn.Module):
    def __init__(
        self, in_dim: int, hidden: int, out_dim: int, mean: torch.Tensor, std: torch.Tensor, act: str = "gelu"
    ):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, out_dim)
        if act != "gelu":
            raise ValueError(f"only LLaVA's gelu projector is supported, not {act!r}")
        self.act = nn.GELU()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clamp_min(1e-3).clone())

    @classmethod
    def like(cls, llava_projector: nn.Module, mean, std) -> StandardizedProjector:
        l1, l2 = llava_projector.linear_1, llava_projector.linear_2
        return cls(l1.in_features, l1.out_features, l2.out_features, mean, std)

    def init(self, seed: int, out_std: float | None = None, sample: torch.Tensor | None = None) -> None:
        """nn.Linear's default init from `seed`; then scale linear_2 so that the outputs on `sample` have
        standard deviation `out_std` (e.g. that of the LM's token embeddings)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for lin in (self.linear_1, self.linear_2):
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=g)
                bound = 1.0 / math.sqrt(lin.weight.shape[1])
                nn.init.uniform_(lin.bias, -bound, bound, generator=g)
            if out_std is not None and sample is not None:
                y = self(sample.float())
                scale = out_std / y.std().clamp_min(1e-8)
                self.linear_2.weight.mul_(scale)
                self.linear_2.bias.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.mean.dtype) - self.mean) / self.std
        return self.linear_2(self.act(self.linear_1(x)))

    def load_llava_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Start from a LLaVA projector state dict (inverse of `llava_state_dict`: the standardisation is
        unfolded from linear_1, so the module computes the same function)."""
        w = state["linear_1.weight"].double()
        mu, sd = self.mean.double(), self.std.double()
        with torch.no_grad():
            self.linear_1.weight.copy_((w * sd).float())
            self.linear_1.bias.copy_((state["linear_1.bias"].double() + w @ mu).float())
            self.linear_2.weight.copy_(state["linear_2.weight"].float())
            self.linear_2.bias.copy_(state["linear_2.bias"].float())

    def llava_state_dict(self) -> dict[str, torch.Tensor]:
        """The equivalent LLaVA projector state dict (standardisation folded into linear_1), fp32."""
        w1 = self.linear_1.weight.detach().double()
        b1 = self.linear_1.bias.detach().double()
        mu, sd = self.mean.double(), self.std.double()
        sd_ = {
            "linear_1.weight": (w1 / sd).float(),
            "linear_1.bias": (b1 - (w1 / sd) @ mu).float(),
            "linear_2.weight": self.linear_2.weight.detach().float(),
            "linear_2.bias": self.linear_2.bias.detach().float(),
        }
        assert set(sd_) == set(PROJECTOR_KEYS)
        return {k: v.contiguous().clone() for k, v in sd_.items()}


def channel_stats(features: torch.Tensor, max_rows: int = 200_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean / std of [N, T, D] features (a deterministic subsample of at most max_rows tokens)."""
    flat = features.reshape(-1, features.shape[-1])
    if flat.shape[0] > max_rows:
        idx = torch.linspace(0, flat.shape[0] - 1, max_rows).long()
        flat = flat[idx]
    flat = flat.float()
    return flat.mean(0), flat.std(0)


def save_llava_projector(state: dict[str, torch.Tensor], path, metadata: dict | None = None):
    """Write a LLaVA projector state dict as safetensors (the format `kvpress_mm.offline.load_projector` reads)."""
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "kvpress_mm": "mini_llava projector"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    import os

    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def average_projectors(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], weight: float = 0.5
) -> dict[str, torch.Tensor]:
    """(1 - weight) * first + weight * second, tensor by tensor: a "model soup" of two projectors fine-tuned
    from the same start (stage 3 from stage 2), which keeps most of what each stage learned."""
    if set(first) != set(second) or any(first[k].shape != second[k].shape for k in first):
        raise ValueError("the two projectors have different tensors; only projectors of one architecture average")
    if not 0.0 <= float(weight) <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight!r}")
    return {k: (1 - weight) * first[k].float() + weight * second[k].float() for k in first}
