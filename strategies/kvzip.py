"""KVzip (Kim et al., 2025, arXiv 2505.23416): keep what the model needs to repeat the context.

Question-agnostic: the score of a KV pair is the attention it gets while the model reads the context back, so
the compressed cache serves any later question (`compress_context(...).ask(...)`). Choices beyond the paper
(images, padding, budgets): docs/strategies-kvzip.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from kvpress_mm.layer import LayerKV, Plan
from kvpress_mm.modality import Modality
from kvpress_mm.registry import register_preset, register_strategy
from kvpress_mm.replay import ReplayRound
from kvpress_mm.selection import allocate_layers, proportional_counts, top_per_head
from kvpress_mm.strategy import EvictionStrategy
from kvpress_mm.validate import check_choice, check_int, warn_ignored

logger = logging.getLogger("kvpress_mm")

HEAD_BUDGETS = ("model", "layer", "uniform")
MODALITY_BUDGETS = ("shared", "proportional")
INSTRUCTIONS = ("repeat", "none")
# the paper's repeat prompts (Algorithm 1): the first chunk, and every later one after a span of the previous
REPEAT = "Repeat the previous context:"
REPEAT_FROM = "Repeat the previous context starting with"

_TOKENIZERS: dict[str, object] = {}  # model name -> its tokenizer (None: none stored here)


@register_strategy("kvzip")
@dataclass
class KVzip(EvictionStrategy):
    """Score every context KV pair by the attention it gets while the context is repeated; keep the best.

    Algorithm (per row), after the context's prefill:
      1. split the context into chunks of `chunk_size` tokens; for chunk t the replay is
         "Repeat the previous context:" + chunk (t = 1), or
         "Repeat the previous context starting with" + the last `overlap` tokens of chunk t-1 + ":" + chunk
      2. forward each replay on the full context cache (teacher forcing); in every layer, softmax the replay's
         queries over the chunk's keys and the replay's own keys
      3. score[l, h, i] = max over the replay's queries and kv head h's query heads of that probability
      4. head_budgets="model": keep the pairs with the top scores across every layer and head (the paper's
         default), "layer": within each layer across its heads, "uniform": within each head
      5. the replay's tokens leave the cache; it is compacted to the kept pairs
    Images: the replay repeats the context's text tokens only; image keys are scored by the text's replay.
    modality_budgets="proportional" (this project's, not the paper's): steps 4's rankings run within text and
    within vision tokens separately, each keeping its share of the budget (its share of the real tokens), since
    a text replay attends little to images (mini_llava keeps ~2% of an image's tokens at budget 0.2 otherwise).
    """

    head_budgets: str = "model"
    instruction: str = "repeat"
    chunk_size: int = 2048
    overlap: int = 8
    modality_budgets: str = "shared"

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_choice(owner, "head_budgets", self.head_budgets, HEAD_BUDGETS)
        check_choice(owner, "instruction", self.instruction, INSTRUCTIONS)
        check_int(owner, "chunk_size", self.chunk_size, minimum=1)
        check_int(owner, "overlap", self.overlap, minimum=0)
        check_choice(owner, "modality_budgets", self.modality_budgets, MODALITY_BUDGETS)
        if self.compress == "every_prompt":
            warn_ignored(
                owner, "compress", self.compress, "KVzip replays a cache's first prompt only; later ones are appended"
            )

    # the session's cross-layer allocation, and head-wise counts, follow head_budgets
    @property
    def budget_scope(self) -> str:
        return "model" if self.head_budgets == "model" else "layer"

    @property
    def headwise_budgets(self) -> bool:
        return self.head_budgets != "uniform"

    # ------------------------------------------------------------------ 1. the replay
    def replay_rounds(self, ids: torch.Tensor, modality: torch.Tensor, model) -> list[ReplayRound]:
        """One round per chunk of each row's real tokens (rows are left-padded); a row out of chunks sits out."""
        first, again, colon = self.instruction_ids(model)
        ids, modality = ids.cpu(), modality.cpu()
        batch, length = ids.shape
        real = modality != int(Modality.PAD)
        text = modality == int(Modality.TEXT)
        n_real = real.sum(-1).tolist()
        starts = [length - n for n in n_real]
        m = self.chunk_size
        rounds = []
        for t in range(math.ceil(max(n_real, default=0) / m)):
            rows, spans = [], []
            for b in range(batch):
                s, e = starts[b] + t * m, min(length, starts[b] + (t + 1) * m)
                if s >= e:
                    rows.append([])
                    spans.append((length, length))
                    continue
                chunk = ids[b, s:e][text[b, s:e]].tolist()
                if t == 0:
                    prefix = first
                else:
                    before = ids[b, s - m : s][text[b, s - m : s]].tolist()
                    prefix = again + (before[-self.overlap :] if self.overlap else []) + colon
                rows.append(prefix + chunk)
                spans.append((s, e))
            width = max(len(r) for r in rows)
            if width == 0:
                continue
            out = torch.zeros((batch, width), dtype=torch.long)
            valid = torch.zeros((batch, width), dtype=torch.bool)
            for b, row in enumerate(rows):
                out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
                valid[b, : len(row)] = True
            rounds.append(ReplayRound(out, valid, torch.tensor(spans, dtype=torch.long)))
        return rounds

    def instruction_ids(self, model) -> tuple[list[int], list[int], list[int]]:
        """Token ids of the repeat prompt, its later-chunk form and ":" (all empty with instruction="none").

        The tokenizer is `strategy.tokenizer` when set, else the model's own (from its name, local files only);
        without one the replay is the context alone (logged once per model)."""
        if self.instruction == "none":
            return [], [], []
        tokenizer = getattr(self, "tokenizer", None) or _tokenizer_of(model)
        if tokenizer is None:
            return [], [], []

        def encode(text: str) -> list[int]:
            return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]

        return encode(REPEAT), encode(REPEAT_FROM), encode(":")

    # ------------------------------------------------------------------ 3. scores
    def scores(self, layer: LayerKV) -> torch.Tensor:
        """[B, Hkv, S] max over the kv head's query heads of the replay maxima (zeros on a LayerKV without any)."""
        replay = layer.replay_attention
        if replay is None:
            return torch.zeros((layer.batch, layer.kv_heads, layer.length), device=layer.keys.device)
        b, h, s = replay.shape
        return replay.float().view(b, layer.kv_heads, h // layer.kv_heads, s).amax(2)

    # ------------------------------------------------------------------ 4. budgets
    def layer_summary(self, layer: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, Hkv, S] the layer's scores, padding -inf; [B, S] each position's budget group), for allocate."""
        return self.scores(layer).masked_fill(~layer.valid[:, None, :], float("-inf")), self._groups(layer.modality)

    def allocate(self, summaries: list, n_valid: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Per-layer counts [layers, B] from the top scores of every (layer, head, position) together (within
        each budget group: text, vision)."""
        uniform = self.kept_counts(n_valid, 0, num_layers)
        heads = [s.shape[1] for s, _ in summaries]
        device = n_valid.device
        flat = torch.cat([s.to(device).flatten(1) for s, _ in summaries], dim=1)  # [B, all pairs]
        groups = torch.cat([g.to(device)[:, None, :].expand_as(s).flatten(1) for s, g in summaries], dim=1)
        chosen = self._top_by_group(flat[:, None, :], groups[:, None, :], (uniform * sum(heads))[:, None])[:, 0]
        sizes = [h * s.shape[2] for h, (s, _) in zip(heads, summaries)]
        pairs = torch.stack([part.sum(-1) for part in chosen.split(sizes, dim=1)])
        demand = pairs.double() / torch.tensor(heads, dtype=torch.float64, device=pairs.device)[:, None]
        return allocate_layers(demand, n_valid, uniform)

    def plan(self, layer: LayerKV) -> Plan:
        scores = self.scores(layer)
        valid = layer.valid[:, None, :]
        groups = self._groups(layer.modality)[:, None, :]
        if self.head_budgets == "uniform":
            counts = layer.keep_count[:, None].expand(-1, layer.kv_heads)
            return Plan(keep=self._top_by_group(scores, groups.expand_as(scores), counts))
        # every head keeps its best pair (a head needs one slot), the layer's other slots go to the best pairs
        ones = torch.ones((layer.batch, layer.kv_heads), dtype=torch.long, device=scores.device)
        best = top_per_head(scores, ones, valid)
        rank = scores.masked_fill(best | ~valid, float("-inf")).flatten(1)[:, None, :]
        rest = (layer.keep_count * layer.kv_heads - best.sum((1, 2))).clamp(min=0)
        taken = best.flatten(1)[:, None, :]
        flat_groups = groups.expand_as(scores).flatten(1)[:, None, :]
        extra = self._top_by_group(rank, flat_groups, rest[:, None], taken)[:, 0].view_as(best)
        return Plan(keep=best | extra)

    def _groups(self, modality: torch.Tensor) -> torch.Tensor:
        """long [B, S]: each position's budget group (0 text, 1 vision; -1 padding; all 0 when shared)."""
        pad = modality == int(Modality.PAD)
        vision = (modality == int(Modality.IMAGE)) | (modality == int(Modality.VIDEO))
        group = vision.long() if self.modality_budgets == "proportional" else torch.zeros_like(vision, dtype=torch.long)
        return group.masked_fill(pad, -1)

    def _top_by_group(self, scores, groups, counts, taken=None) -> torch.Tensor:
        """bool [B, H, S]: top_per_head of scores [B, H, S] (-inf: never), the counts [B, H] split over the groups
        [B, H, S] in proportion to their positions (those already `taken` count to their group's share)."""
        if self.modality_budgets == "shared":
            return top_per_head(scores, counts, groups >= 0)
        sizes = torch.stack([(groups == g).sum(-1) for g in (0, 1)], dim=-1)  # [B, H, 2]
        already = (
            torch.zeros_like(sizes)
            if taken is None
            else torch.stack([(taken & (groups == g)).sum(-1) for g in (0, 1)], dim=-1)
        )
        total = counts + already.sum(-1)
        # each group's share of every kept pair, less what it already holds, within what it has left
        share = proportional_counts(sizes.double(), total, sizes, low=already.clamp(max=sizes))
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        for g in (0, 1):
            mask = groups == g
            keep |= top_per_head(scores.masked_fill(~mask, float("-inf")), share[..., g] - already[..., g], mask)
        return keep


# the recommended default of the CLI: KVzip with text and vision ranked apart (docs/strategies-kvzip.md)
register_preset(
    "kvzip_mm", KVzip, description="KVzip, text and vision keep their shares", modality_budgets="proportional"
)


def _tokenizer_of(model):
    """The model's tokenizer from its name (local files only), or None; looked up once per name."""
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = None
        if name:
            try:
                from transformers import AutoTokenizer

                _TOKENIZERS[name] = AutoTokenizer.from_pretrained(name, local_files_only=True)
            except Exception:  # noqa: BLE001 - any failure means: no tokenizer here
                pass
        if _TOKENIZERS[name] is None:
            logger.warning(
                "KVzip: no tokenizer for model %r (set strategy.tokenizer); its replay is the context alone",
                name,
            )
    return _TOKENIZERS[name]
