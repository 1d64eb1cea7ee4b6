"""Cache size before and after compression, for users and the evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

from .cache_ops import layer_bytes


@dataclass
class CacheSize:
    """Physical size of a cache: sequence slots per layer and total bytes of keys + values (a flat layer: the
    slots it stores per (row, kv head) on average, rounded up, and its real bytes)."""

    tokens_per_layer: list[int]
    bytes: int

    @property
    def tokens(self) -> int:
        return sum(self.tokens_per_layer)


def cache_size(cache) -> CacheSize:
    """Size of a transformers Cache (e.g. the DynamicCache returned by generate).

    TypeError naming what was passed when `cache` is not one (None, a legacy tuple of (key, value)
    tuples, the generate output that holds the cache, ...).
    """
    layers = getattr(cache, "layers", None)
    if layers is None or isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"cache_size: expected a transformers Cache, {_cache_hint(cache)}")
    tokens, total = [], 0
    for layer in layers:
        if callable(getattr(layer, "kv_bytes", None)):  # a flat layer (compressed_cache.FlatLayer)
            tokens.append(layer.stored_length())
            total += layer.kv_bytes()
            continue
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.numel() == 0:
            tokens.append(0)
            continue
        tokens.append(int(keys.shape[-2]))
        total += layer_bytes(keys, values)
    return CacheSize(tokens, total)


def _cache_hint(cache) -> str:
    """What was passed instead of a Cache, and what is accepted."""
    accepted = (
        "a Cache with per-layer .layers, e.g. a DynamicCache such as "
        "model.generate(..., return_dict_in_generate=True).past_key_values"
    )
    if cache is None:
        got = "got None"
    elif isinstance(cache, (int, float, str)):
        got = f"got {type(cache).__name__} {cache!r}"
    else:
        got = f"got {type(cache).__name__}"
    if getattr(cache, "past_key_values", None) is not None:
        return f"{got}, which holds one: pass its .past_key_values ({accepted})"
    if isinstance(cache, (tuple, list)):
        return f"{got} (the legacy tuple-of-(key, value) format is not accepted; pass {accepted})"
    return f"{got}; pass {accepted}"


@dataclass
class LayerReport:
    before_tokens: int
    after_tokens: int
    before_bytes: int
    after_bytes: int
    kept_fraction: float | None  # real tokens kept / real prompt tokens (rows, kv heads); None: not compressible


@dataclass
class CompressionReport:
    """What the last prefill's compression did, per layer (sliding-window layers appear unchanged)."""

    layers: dict[int, LayerReport] = field(default_factory=dict)

    @property
    def before_bytes(self) -> int:
        return sum(r.before_bytes for r in self.layers.values())

    @property
    def after_bytes(self) -> int:
        return sum(r.after_bytes for r in self.layers.values())

    @property
    def before_tokens(self) -> list[int]:
        return [self.layers[i].before_tokens for i in sorted(self.layers)]

    @property
    def after_tokens(self) -> list[int]:
        return [self.layers[i].after_tokens for i in sorted(self.layers)]

    @property
    def kept_fraction(self) -> float:
        """Mean over the compressible layers (sliding-window layers are not counted)."""
        fractions = [r.kept_fraction for r in self.layers.values() if r.kept_fraction is not None]
        return sum(fractions) / len(fractions) if fractions else 1.0

    def summary(self) -> str:
        mib = 1024 * 1024
        return (
            f"KV cache {self.before_bytes / mib:.2f} MiB -> {self.after_bytes / mib:.2f} MiB "
            f"({self.after_bytes / max(1, self.before_bytes):.1%}), kept {self.kept_fraction:.1%} of prompt tokens"
        )
