"""The prompt a forward is prefilling: its modality labels, real positions and the kept counts per layer.

A prompt is either the first one a cache sees (its keys are the whole layer) or a later one appended
to a compressed past (a follow-up turn, a question about a compressed context): then it is the last
`length` keys of each layer. Everything here depends only on the prompt, so it is computed once per
prompt and device, not once per layer.
"""

from __future__ import annotations

import torch

from .modality import Modality


class Prompt:
    """modality: [B, L] int8 labels of the new tokens (PAD on padding), on the model's input device.
    token_ids: [B, L] their input ids, or None (a prompt given as embeddings)."""

    def __init__(
        self, modality: torch.Tensor, strategy, num_layers: int, first: bool, token_ids: torch.Tensor | None = None
    ):
        self.modality = modality
        self.token_ids = token_ids
        self.length = modality.shape[1]
        self.first = first
        self.strategy = strategy
        self.num_layers = num_layers
        self._by_device: dict = {}
        self._keep: dict[int, tuple[torch.Tensor, bool]] = {}
        self._ids_by_device: dict = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """(modality, valid [B, L], n_valid [B], every position real?) on `device`, one host read per device."""
        if device not in self._by_device:
            modality = self.modality.to(device)
            valid = modality != int(Modality.PAD)
            self._by_device[device] = (modality, valid, valid.sum(-1), bool(valid.all()))
        return self._by_device[device]

    def ids_on(self, device: torch.device) -> torch.Tensor | None:
        """token_ids on `device` (None without input ids)."""
        if self.token_ids is None:
            return None
        if device not in self._ids_by_device:
            self._ids_by_device[device] = self.token_ids.to(device)
        return self._ids_by_device[device]

    def set_keep_counts(self, counts: dict[int, torch.Tensor]) -> None:
        """Replace the budget rule's counts by a cross-layer allocation: layer -> [B] tokens kept.

        Whether each layer still evicts is read back in one host read for all of them."""
        layers = list(counts)
        n_valid = [self.on(counts[i].device)[2] for i in layers]
        home = counts[layers[0]].device
        evicts = torch.stack([(counts[i] < n).any().to(home) for i, n in zip(layers, n_valid)])
        for i, flag in zip(layers, evicts.tolist()):
            self._keep[i] = (counts[i], bool(flag))

    def keep_counts(self, idx: int, device: torch.device) -> torch.Tensor:
        """[B] tokens layer `idx` keeps of this prompt (the strategy's budget rule)."""
        if idx not in self._keep:
            _, _, n_valid, _ = self.on(device)
            counts = self.strategy.kept_counts(n_valid, idx, self.num_layers).to(device)
            self._keep[idx] = (counts, bool((counts < n_valid).any()))
        return self._keep[idx][0]

    def evicts(self, idx: int, device: torch.device) -> bool:
        """Whether layer `idx` drops any real token of this prompt."""
        self.keep_counts(idx, device)
        return self._keep[idx][1]
