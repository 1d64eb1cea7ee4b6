"""Installing and removing a session's hooks: the attention wrapper, the forward hooks, the backend switch.

While a session is active, the text decoder's attention implementation is a registered wrapper of the
model's own one (`kvpress_mm_sdpa` / `kvpress_mm_eager`) that hands each managed layer's call to the
session. On Qwen-VL a continued compressed cache also brings its own M-RoPE offset (`RopeOffset`). Everything
is undone on exit, also after an exception; nothing is patched at import time.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .backend import set_decoder_attention
from .compressed_cache import CompressedCache

SUPPORTED_BACKENDS = ("sdpa", "eager")

# id(attention module) -> the session compressing it
_ACTIVE: dict[int, object] = {}

# generate's hook for position ids, read before the first forward (Qwen-VL adds its rope_deltas there)
_PREPARE_POSITIONS = "_prepare_position_ids_for_generation"
_MISSING = object()


def _wrapper_name(backend: str) -> str:
    return f"kvpress_mm_{backend}"


def base_attention(backend: str, module: torch.nn.Module):
    """The model's own attention function for `backend`."""
    if backend == "eager":
        # every transformers modeling file defines its own eager function (softcap, sinks, ...)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[backend]


def _register_wrapper(backend: str) -> str:
    name = _wrapper_name(backend)
    if name not in AttentionInterface._global_mapping:

        def attention(module, query, key, value, attention_mask, **kwargs):
            base = base_attention(backend, module)
            session = _ACTIVE.get(id(module))
            if session is None:
                return base(module, query, key, value, attention_mask, **kwargs)
            return session.attention(base, module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[backend])
    return name


def _cache_from(kwargs: dict):
    for name in ("cache", "past_key_values", "past_key_value"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def rope_owner(model: torch.nn.Module):
    """The module keeping Qwen-VL's M-RoPE offset (`rope_deltas`: Qwen2-VL / Qwen2.5-VL), or None."""
    for module in (model, getattr(model, "model", None)):
        if module is not None and hasattr(module, "rope_deltas"):
            return module
    return None


class RopeOffset:
    """A continued compressed cache reads its own M-RoPE offset, not the model's.

    transformers keeps Qwen-VL's offset (rope_deltas [B, 1]: M-RoPE positions minus token positions) of the
    last prompt prefilled on the model, and reads it when a call continues a cache: generate in its position
    ids (`_prepare_position_ids_for_generation`, before the first forward), a forward without position ids in
    its own. So after another conversation ran on the model, a follow-up turn would get that one's offset.
    While installed, a call (generate's position ids, a forward) that continues a CompressedCache carrying
    `rope_deltas` (the session keeps its first prompt's there) has the model's offset set to the cache's and
    restored afterwards: continuing a cache leaves the model as it was. Other calls (a first prompt, a plain
    DynamicCache) are left to the model.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.owner = rope_owner(model)
        self._handles: list = []
        self._saved: list = []  # per running forward: (swapped?, the model's offset before it)
        self._prepare = None  # (the installed generate hook, the instance attribute it shadows or _MISSING)

    def install(self) -> None:
        if self.owner is None or self._handles:
            return
        model = self.model
        if callable(getattr(type(model), _PREPARE_POSITIONS, None)):
            original = getattr(model, _PREPARE_POSITIONS)

            def prepare_position_ids(inputs_tensor, model_kwargs):
                cache = _cache_from(model_kwargs)
                if self._offset(cache) is None:
                    return original(inputs_tensor, model_kwargs)
                saved = self._swap(cache)
                try:
                    return original(inputs_tensor, model_kwargs)
                finally:
                    self.owner.rope_deltas = saved

            # an instance attribute (this model only), removed on exit
            self._prepare = (prepare_position_ids, model.__dict__.get(_PREPARE_POSITIONS, _MISSING))
            model.__dict__[_PREPARE_POSITIONS] = prepare_position_ids
        self._handles.append(model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self._saved:  # a forward left by an exception the hooks did not see end
            swapped, saved = self._saved.pop()
            if swapped:
                self.owner.rope_deltas = saved
        if self._prepare is not None:
            installed, shadowed = self._prepare
            self._prepare = None
            if self.model.__dict__.get(_PREPARE_POSITIONS) is installed:
                if shadowed is _MISSING:
                    del self.model.__dict__[_PREPARE_POSITIONS]
                else:
                    self.model.__dict__[_PREPARE_POSITIONS] = shadowed

    @staticmethod
    def _offset(cache) -> torch.Tensor | None:
        """The cache's own offset when this call continues it, else None (the model's is used)."""
        if not isinstance(cache, CompressedCache) or not isinstance(cache.rope_deltas, torch.Tensor):
            return None
        return cache.rope_deltas if cache.get_seq_length() > 0 else None

    def _swap(self, cache):
        saved = self.owner.rope_deltas
        self.owner.rope_deltas = cache.rope_deltas
        return saved

    def _before_forward(self, module, args, kwargs) -> None:
        cache = _cache_from(kwargs)
        if self._offset(cache) is None:
            self._saved.append((False, None))
        else:
            self._saved.append((True, self._swap(cache)))

    def _after_forward(self, module, args, kwargs, output) -> None:
        if not self._saved:  # an earlier pre-hook raised before this one ran
            return
        swapped, saved = self._saved.pop()
        if swapped:
            self.owner.rope_deltas = saved


class Hooks:
    """The hooks of one session on one model; `install()` / `remove()` (idempotent, exception-safe)."""

    def __init__(self, model: torch.nn.Module, decoder: torch.nn.Module, attention_modules: dict[int, torch.nn.Module]):
        self.model = model
        self.decoder = decoder
        self.attention_modules = attention_modules
        self.backend: str | None = None  # the decoder's own attention implementation, read on install
        self.rope = RopeOffset(model)
        self._handles: list = []

    def active_elsewhere(self) -> bool:
        return any(id(m) in _ACTIVE for m in self.attention_modules.values())

    def install(self, session, before_forward, after_forward, after_attention) -> str:
        """Route the decoder's attention through `session`; returns the model's own backend."""
        if self.active_elsewhere():
            raise RuntimeError("this model is already inside a kvpress-mm strategy context; contexts do not nest")
        self.backend = self.decoder.config._attn_implementation
        if self.backend not in SUPPORTED_BACKENDS:
            raise ValueError(
                f"kvpress-mm works with the language model's attention backends {SUPPORTED_BACKENDS}, "
                f"this model uses {self.backend!r}; load it with attn_implementation='sdpa'"
            )
        try:
            self.rope.install()  # first: its pre-hook runs before the session's (which may raise)
            set_decoder_attention(self.model, self.decoder, _register_wrapper(self.backend))
            for module in self.attention_modules.values():
                _ACTIVE[id(module)] = session
                self._handles.append(module.register_forward_hook(after_attention, with_kwargs=True))
            self._handles.append(self.model.register_forward_pre_hook(before_forward, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(after_forward, with_kwargs=True, always_call=True))
        except BaseException:
            self.remove(session)
            raise
        return self.backend

    def remove(self, session) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.rope.remove()
        for module in self.attention_modules.values():
            if _ACTIVE.get(id(module)) is session:
                del _ACTIVE[id(module)]
        if self.backend is not None and self.decoder.config._attn_implementation != self.backend:
            set_decoder_attention(self.model, self.decoder, self.backend)
