"""Head profiles: a per-(layer, query head) score of how "visual" each attention head of a model is.

SparseMM (Wang et al., ICCV 2025, arXiv 2506.05344) finds a model's visual heads once, offline, and gives them
most of the KV budget. A profile is that finding in a small JSON file:

    {"format": "kvpress-mm head profile", "version": 1,
     "model": {"model_type": "llava", "num_layers": 30, "num_kv_heads": 3, "num_query_heads": 9,
               "name": "mini_llava"},
     "scores": [[s_0_0, ..., s_0_8], ..., [s_29_0, ..., s_29_8]],     # [num_layers][num_query_heads], >= 0
     "method": {"command": "kvpress-mm profile-heads", "samples": 24, ...}}   # how it was made (free form)

`model` is the identity a profile is checked against (model_type, layer count, kv and query heads; `name` is
informational); a mismatch is a ValueError naming every field that differs.

    profile = HeadProfile.load(path); profile.check(model)     # or find_profile(model, path)
    profile.kv_scores()                                          # [num_layers, num_kv_heads] (query groups summed)
    find_profile(model)                                          # a shipped profile of the same identity, or an
                                                                 # error naming `kvpress-mm profile-heads`

Shipped profiles live in kvpress_mm/profiles/*.json (package data): mini_llava's, made by
`kvpress-mm profile-heads` (docs/strategies-heads.md). `measure_visual_heads` is the measurement itself: the
answer-predicting queries' top-k keys, counted when they fall on the image that holds the answer.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .validate import is_int, is_number

FORMAT = "kvpress-mm head profile"
VERSION = 1
PROFILE_COMMAND = "kvpress-mm profile-heads"
SHIPPED_DIR = Path(__file__).with_name("profiles")
AUTO = "auto"  # a strategy's profile field: the shipped profile of the model's identity


@dataclass(frozen=True)
class ModelIdentity:
    """What a profile must match: the top-level model_type and the text decoder's layer and head counts."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    num_query_heads: int
    name: str | None = None  # e.g. "mini_llava"; informational, not compared

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelIdentity:
        """The identity of a transformers model kvpress-mm supports (its text decoder's config)."""
        from .adapters import adapter_for

        config = adapter_for(model).decoder(model).config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        name_or_path = str(getattr(model.config, "_name_or_path", "") or "")
        return cls(
            model_type=str(model.config.model_type),
            num_layers=int(config.num_hidden_layers),
            num_kv_heads=kv_heads,
            num_query_heads=heads,
            name=os.path.basename(name_or_path.rstrip("/\\")) or None,
        )

    def describe(self) -> str:
        name = f"{self.name}: " if self.name else ""
        return (
            f"{name}model_type={self.model_type!r}, {self.num_layers} layers, {self.num_kv_heads} kv heads, "
            f"{self.num_query_heads} query heads"
        )

    def mismatches(self, other: ModelIdentity) -> list[str]:
        """'field (self vs other)' for every compared field that differs."""
        out = []
        for key in ("model_type", "num_layers", "num_kv_heads", "num_query_heads"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                out.append(f"{key} ({mine!r} in the profile, {theirs!r} in the model)")
        return out

    def as_dict(self) -> dict:
        out = {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "num_query_heads": self.num_query_heads,
        }
        if self.name:
            out["name"] = self.name
        return out


@dataclass
class HeadProfile:
    """scores: float64 [num_layers, num_query_heads], >= 0 (higher = more visual); method: how it was made."""

    model: ModelIdentity
    scores: torch.Tensor
    method: dict = field(default_factory=dict)
    source: str | None = None  # the file it was read from (for error messages)

    def __post_init__(self):
        self.scores = torch.as_tensor(self.scores, dtype=torch.float64)
        where = f"head profile {self.source}" if self.source else "head profile"
        m = self.model
        expected = (m.num_layers, m.num_query_heads)
        if self.scores.dim() != 2 or tuple(self.scores.shape) != expected:
            raise ValueError(
                f"{where}: scores must be a [num_layers={m.num_layers}][num_query_heads={m.num_query_heads}] "
                f"matrix, got shape {list(self.scores.shape)}"
            )
        if m.num_layers < 1 or m.num_kv_heads < 1 or m.num_query_heads % m.num_kv_heads:
            raise ValueError(
                f"{where}: {m.num_query_heads} query heads cannot be grouped over {m.num_kv_heads} kv heads "
                f"({m.num_layers} layers)"
            )
        if not bool(torch.isfinite(self.scores).all()) or bool((self.scores < 0).any()):
            raise ValueError(f"{where}: scores must be finite and >= 0")

    # ------------------------------------------------------------------ views
    def kv_scores(self) -> torch.Tensor:
        """float64 [num_layers, num_kv_heads]: each kv head's score, the sum over its query group (SparseMM)."""
        m = self.model
        return self.scores.view(m.num_layers, m.num_kv_heads, m.num_query_heads // m.num_kv_heads).sum(-1)

    def top_heads(self, n: int = 10) -> list[tuple[int, int, float]]:
        """The n best (layer, query head, score), best first."""
        flat = self.scores.flatten()
        order = flat.argsort(descending=True)[:n].tolist()
        heads = self.model.num_query_heads
        return [(i // heads, i % heads, float(flat[i])) for i in order]

    # ------------------------------------------------------------------ checks
    def check(self, model_or_identity) -> HeadProfile:
        """Return self if it was made for this model (a transformers model or a ModelIdentity), else ValueError."""
        identity = model_or_identity
        if not isinstance(identity, ModelIdentity):
            identity = ModelIdentity.of(model_or_identity)
        bad = self.model.mismatches(identity)
        if bad:
            raise ValueError(
                f"head profile {self.source or '(in memory)'} was made for {self.model.describe()}, not for this "
                f"model ({identity.describe()}): mismatched {'; '.join(bad)}. Make a profile for this model with "
                f"`{PROFILE_COMMAND} model=<its model config>`"
            )
        return self

    def check_dims(self, num_layers: int, num_kv_heads: int, num_query_heads: int) -> HeadProfile:
        """Check the counts only (a LayerKV does not know its model_type)."""
        m = self.model
        got = (num_layers, num_kv_heads, num_query_heads)
        if (m.num_layers, m.num_kv_heads, m.num_query_heads) != got:
            raise ValueError(
                f"head profile {self.source or '(in memory)'} was made for {m.describe()}, but the layer has "
                f"{num_layers} layers, {num_kv_heads} kv heads, {num_query_heads} query heads"
            )
        return self

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model.as_dict(),
            "scores": [[float(x) for x in row] for row in self.scores.tolist()],
            "method": dict(self.method),
        }

    def to_json(self) -> str:
        """The file's text: one line per layer of scores."""
        data = self.to_dict()
        rows = ",\n".join("  " + json.dumps(row) for row in data.pop("scores"))
        head = json.dumps({k: data[k] for k in ("format", "version", "model")}, indent=1)[:-2]
        method = json.dumps(data["method"], indent=1).replace("\n", "\n ")
        return f'{head},\n "scores": [\n{rows}\n ],\n "method": {method}\n}}\n'

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data, source: str | None = None) -> HeadProfile:
        where = f"head profile {source}" if source else "head profile"
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: not a head profile (format must be {FORMAT!r}, got {data.get('format')!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"{where}: version {data.get('version')!r} is not supported (this reads {VERSION})")
        missing = [k for k in ("model", "scores") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        model = data["model"]
        keys = ("model_type", "num_layers", "num_kv_heads", "num_query_heads")
        if not isinstance(model, dict) or any(k not in model for k in keys):
            raise ValueError(f"{where}: model must give {', '.join(keys)}, got {model!r}")
        if not isinstance(model["model_type"], str) or not all(_is_count(model[k]) for k in keys[1:]):
            raise ValueError(f"{where}: model_type must be a string and the counts positive integers, got {model!r}")
        identity = ModelIdentity(
            model["model_type"], model["num_layers"], model["num_kv_heads"], model["num_query_heads"], model.get("name")
        )
        scores = data["scores"]
        rows_ok = isinstance(scores, list) and all(isinstance(r, list) for r in scores)
        if not rows_ok or not all(is_number(x) for r in scores for x in r):
            raise ValueError(f"{where}: scores must be a list of rows of numbers")
        if len({len(r) for r in scores}) > 1:
            raise ValueError(f"{where}: scores rows have different lengths {sorted({len(r) for r in scores})}")
        tensor = torch.tensor(scores, dtype=torch.float64) if scores and scores[0] else torch.zeros(len(scores), 0)
        method = data.get("method", {})
        return cls(identity, tensor, dict(method) if isinstance(method, dict) else {"note": method}, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadProfile:
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ValueError(f"head profile {str(path)!r} {what}; make one with `{PROFILE_COMMAND}`")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"head profile {str(path)!r} cannot be read as JSON: {err}") from None
        return cls.from_dict(data, source=str(path))


def _is_count(x) -> bool:
    return is_int(x) and x >= 1


# ============================================================================ lookup


def shipped_profiles() -> list[Path]:
    """The profiles shipped with kvpress-mm (kvpress_mm/profiles/*.json), sorted."""
    return sorted(SHIPPED_DIR.glob("*.json")) if SHIPPED_DIR.is_dir() else []


def check_profile_field(owner: str, value) -> str:
    """A strategy's `profile` field: "auto" or the path of a readable head profile (else ValueError)."""
    from .validate import check_str

    check_str(owner, "profile", value, what=f'"{AUTO}" or the path of a head profile JSON file')
    if value != AUTO:
        try:
            load_profile(value)
        except ValueError as err:
            raise ValueError(f"{owner}: profile must be {AUTO!r} or a head profile file: {err}") from None
    return value


_CACHE: dict[tuple[str, float, int], HeadProfile] = {}


def load_profile(path: str | os.PathLike) -> HeadProfile:
    """HeadProfile.load, remembered per (absolute path, modification time, size)."""
    resolved = Path(path).expanduser()
    try:
        stat = resolved.stat()
        key = (str(resolved.resolve()), stat.st_mtime, stat.st_size)
    except OSError:
        return HeadProfile.load(resolved)  # raises the clear error
    if key not in _CACHE:
        _CACHE[key] = HeadProfile.load(resolved)
    return _CACHE[key]


def find_profile(model_or_identity, path: str | os.PathLike | None = None, owner: str = "") -> HeadProfile:
    """The head profile for a model: `path` (checked against the model) when given (or not "auto"), else the
    shipped profile with the model's identity. No profile: a ValueError naming `kvpress-mm profile-heads`."""
    identity = model_or_identity
    if not isinstance(identity, ModelIdentity):
        identity = ModelIdentity.of(model_or_identity)
    if path is not None and str(path) != AUTO:
        return load_profile(path).check(identity)
    for candidate in shipped_profiles():
        profile = load_profile(candidate)
        if not profile.model.mismatches(identity):
            return profile
    shipped = [load_profile(p).model.describe() for p in shipped_profiles()]
    prefix = f"{owner}: " if owner else ""
    raise ValueError(
        f"{prefix}no head profile for this model ({identity.describe()}); shipped profiles: "
        f"{'; '.join(shipped) or 'none'}. Make one with `{PROFILE_COMMAND} model=<its model config> "
        f"output=<file.json>` and pass the file as profile=<file.json> (strategy.profile=<file.json> on the "
        "command line)"
    )


# ============================================================================ measuring


@dataclass
class Probe:
    """One prompt whose answer lies in a known image: `target_image` (1-based, in prompt order)."""

    sample: object  # kvpress_mm.eval.Sample
    target_image: int
    score: object = None  # callable(sample, prediction) -> float; None: every generated token counts


@dataclass
class Measurement:
    """Raw visual-head hits: totals [layers, query heads] summed over probes, and what was counted."""

    totals: torch.Tensor
    probes: int = 0
    answered: int = 0  # probes the model answered right (the only ones counted when a probe has a score)
    tokens: int = 0  # queries scored (answer and / or question tokens)
    skipped: list = field(default_factory=list)

    def scores(self) -> torch.Tensor:
        """The mean over probes (SparseMM averages each head's per-sample score over every sample)."""
        return self.totals / max(self.probes, 1)


def image_regions(modality: torch.Tensor) -> list[torch.Tensor]:
    """Positions of each contiguous run of image tokens in a [seq] modality row, in order."""
    from .modality import Modality

    positions = torch.nonzero(modality == int(Modality.IMAGE)).flatten()
    if positions.numel() == 0:
        return []
    breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    return list(torch.tensor_split(positions, breaks.tolist()))


def target_region(modality: torch.Tensor, target_image: int, n_images: int) -> torch.Tensor:
    """The positions of image `target_image` (1-based) of a [seq] prompt holding `n_images` images."""
    runs = image_regions(modality)
    if len(runs) == n_images and 1 <= target_image <= n_images:
        return runs[target_image - 1]
    if n_images == 1 and runs:  # one image in several runs (tiles with markers between): all of it
        return torch.cat(runs)
    raise ValueError(
        f"cannot tell which image tokens belong to image {target_image} of {n_images}: the prompt has "
        f"{len(runs)} runs of image tokens (this model splits images; use prompts with one image)"
    )


def hit_scores(top: torch.Tensor, region: torch.Tensor, num_positions: int) -> torch.Tensor:
    """SparseMM's visual score of one answer token: [layers, heads] 1/|region| where a head's top-k keys
    (top: long [layers, heads, k]) include a position of `region`, else 0."""
    inside = torch.zeros(num_positions, dtype=torch.bool)
    inside[region] = True
    hit = inside[top].any(-1)
    return hit.double() / max(int(region.numel()), 1)


QUERIES = ("answer", "question", "answer+question")


class TopKeyRecorder:
    """An attention function that runs the model's own attention and records each head's top-k keys per
    layer: for the last `prefill_rows` queries of a prompt, then for the one query of each decode step (the
    query that predicts the next token). Batch row 0 only."""

    def __init__(self, base, topk: int):
        self.base = base
        self.topk = topk
        self.prefill_rows = 1
        self.steps: list[dict[int, torch.Tensor]] = []  # per forward: layer -> long [heads, rows, k]

    def start_forward(self) -> None:
        self.steps.append({})

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        out = self.base(module, query, key, value, attention_mask, **kwargs)
        rows = min(self.prefill_rows if len(self.steps) <= 1 else 1, query.shape[2])
        groups = query.shape[1] // key.shape[1]
        q = query[:1, :, -rows:, :].float()
        k = key[:1].float().repeat_interleave(groups, dim=1)
        logits = torch.matmul(q, k.transpose(-1, -2))[0]  # [heads, rows, S]; softmax and scale keep the order
        if attention_mask is not None:
            mask = attention_mask[0, :, -rows:, : k.shape[2]]
            if mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask.expand_as(logits), float("-inf"))
            else:
                logits = logits + mask.float()
        else:  # causal: row r of the last `rows` sees keys up to its own position
            s_len = k.shape[2]
            q_pos = torch.arange(s_len - rows, s_len, device=logits.device)[:, None]
            logits = logits.masked_fill(torch.arange(s_len, device=logits.device)[None, :] > q_pos, float("-inf"))
        if not self.steps:
            self.steps.append({})
        self.steps[-1][module.layer_idx] = logits.topk(min(self.topk, logits.shape[-1]), dim=-1).indices.cpu()
        return out


def _answer_tokens(decode, new_ids: torch.Tensor, answer: str) -> list[int]:
    """Indices of the generated tokens that spell the first whole-word occurrence of `answer`."""
    n = new_ids.shape[-1]
    prefixes = [decode(new_ids[:, : i + 1])[0] for i in range(n)]
    text = prefixes[-1] if prefixes else ""
    match = re.search(rf"(?<![\w]){re.escape(answer.strip())}(?![\w])", text, re.IGNORECASE)
    if match is None:
        return []
    start, end = match.span()
    out, before = [], ""
    for i, prefix in enumerate(prefixes):
        if prefix.startswith(before):
            if len(before) < end and len(prefix) > start:
                out.append(i)
        else:  # decoding is not prefix-stable here: fall back to the token's own text
            piece = decode(new_ids[:, i : i + 1])[0].strip().lower()
            if piece and piece in answer.lower():
                out.append(i)
        before = prefix
    return out


def question_span(bundle, sample) -> tuple[int, int]:
    """[start, end) of the question's tokens in the prompt of `sample`: where its prompt differs from the
    same prompt with an empty question (any model's own chat template and tokenizer)."""
    from dataclasses import replace

    full = bundle.prepare([sample])["input_ids"][0].cpu()
    bare = bundle.prepare([replace(sample, content=[*sample.content[:-1], ""])])["input_ids"][0].cpu()
    n = min(len(full), len(bare))
    prefix = int((full[:n] == bare[:n]).long().cumprod(0).sum())
    suffix = int((full.flip(0)[:n] == bare.flip(0)[:n]).long().cumprod(0).sum())
    end = max(len(full) - suffix, prefix)
    return prefix, end


def measure_visual_heads(
    bundle,
    probes: Iterable[Probe],
    topk: int = 1,
    max_new_tokens: int = 8,
    queries: str = "answer",
    progress=None,
) -> Measurement:
    """SparseMM's visual-head search on `bundle` (kvpress_mm.eval.ModelBundle), one probe at a time.

    For each probe: generate greedily. The scored queries are those that predict a generated token spelling
    the answer (queries="answer", SparseMM's rule; only when the model answered right, as judged by the
    probe's `score`; without `score`, every generated token), the question's own tokens (queries="question"),
    or both. For each scored query, layer and query head: add 1/|image| when one of the head's top-k keys
    lies in the image that holds the answer. Returns the sums; Measurement.scores() averages over all probes.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from .adapters import adapter_for
    from .backend import set_decoder_attention

    if queries not in QUERIES:
        raise ValueError(f"queries must be one of {', '.join(QUERIES)}, got {queries!r}")
    model = bundle.model
    adapter = adapter_for(model)
    decoder = adapter.decoder(model)
    identity = ModelIdentity.of(model)
    original = decoder.config._attn_implementation
    # the model's own registered kernel (sdpa, ...); eager lives in each modeling file: sdpa stands in for it
    base, mask_fn = sdpa_attention_forward, sdpa_mask
    if original in ALL_ATTENTION_FUNCTIONS and original in ALL_MASK_ATTENTION_FUNCTIONS:
        base, mask_fn = ALL_ATTENTION_FUNCTIONS[original], ALL_MASK_ATTENTION_FUNCTIONS[original]
    recorder = TopKeyRecorder(base, topk)
    name = "kvpress_mm_head_probe"
    AttentionInterface.register(name, recorder)
    AttentionMaskInterface.register(name, mask_fn)
    handle = decoder.register_forward_pre_hook(lambda *_: recorder.start_forward())
    measurement = Measurement(torch.zeros(identity.num_layers, identity.num_query_heads, dtype=torch.float64))
    set_decoder_attention(model, decoder, name)
    try:
        for probe in probes:
            _measure_one(bundle, probe, adapter, recorder, measurement, identity, max_new_tokens, queries)
            if progress is not None:
                progress(probe)
    finally:
        handle.remove()
        set_decoder_attention(model, decoder, original)
    return measurement


def _measure_one(bundle, probe, adapter, recorder, measurement, identity, max_new_tokens, queries) -> None:
    model = bundle.model
    inputs = bundle.prepare([probe.sample])
    length = inputs["input_ids"].shape[1]
    n_images = sum(1 for c in probe.sample.content if not isinstance(c, str))
    modality = adapter.modality(model, inputs["input_ids"], inputs.get("attention_mask"), inputs)[0].cpu()
    region = target_region(modality, probe.target_image, n_images)
    q_start, q_end = question_span(bundle, probe.sample) if queries != "answer" else (length - 1, length)
    recorder.steps.clear()
    recorder.prefill_rows = length - q_start
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **bundle.generate_kwargs)
    new_ids = out[:, length:].cpu()
    measurement.probes += 1
    if probe.score is None:
        answer = list(range(new_ids.shape[1]))
    else:
        if not probe.score(probe.sample, bundle.decode(new_ids)[0]):
            measurement.skipped.append(probe.sample.id)
            return
        measurement.answered += 1
        answer = _answer_tokens(bundle.decode, new_ids, str(probe.sample.answer))
    layers = range(identity.num_layers)
    scored = []  # (top [layers, heads, k], number of positions the query saw)
    if queries != "question":
        for t in answer:
            if t < len(recorder.steps):
                scored.append((torch.stack([recorder.steps[t][i][:, -1] for i in layers]), length + t))
    if queries != "answer" and recorder.steps:
        prefill = torch.stack([recorder.steps[0][i] for i in layers])  # [layers, heads, rows, k]
        for pos in range(q_start, q_end):
            scored.append((prefill[:, :, pos - q_start], length))
    for top, seen in scored:
        measurement.totals += hit_scores(top, region, seen)
        measurement.tokens += 1


def profile_from(measurement: Measurement, identity: ModelIdentity, method: dict) -> HeadProfile:
    """The HeadProfile of a measurement (scores = the per-probe mean), with what was counted in `method`."""
    scores = measurement.scores()
    info = {
        **method,
        "probes": measurement.probes,
        "answered": measurement.answered,
        "queries_scored": measurement.tokens,
    }
    if not math.isfinite(float(scores.sum())):
        raise ValueError("the measurement gave non-finite scores")
    return HeadProfile(identity, scores, info)
