"""Installing and removing a session's hooks: the attention wrapper, the forward hooks, the backend switch.

While a session is active, the text decoder's attention implementation is a registered wrapper of the
model's own one (`kvpress_mm_sdpa` / `kvpress_mm_eager`) that hands each managed layer's call to the
session. Everything is undone on exit, also after an exception; nothing is patched at import time.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .backend import set_decoder_attention

SUPPORTED_BACKENDS = ("sdpa", "eager")

# id(attention module) -> the session compressing it
_ACTIVE: dict[int, object] = {}


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


class Hooks:
    """The hooks of one session on one model; `install()` / `remove()` (idempotent, exception-safe)."""

    def __init__(self, model: torch.nn.Module, decoder: torch.nn.Module, attention_modules: dict[int, torch.nn.Module]):
        self.model = model
        self.decoder = decoder
        self.attention_modules = attention_modules
        self.backend: str | None = None  # the decoder's own attention implementation, read on install
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
        for module in self.attention_modules.values():
            if _ACTIVE.get(id(module)) is session:
                del _ACTIVE[id(module)]
        if self.backend is not None and self.decoder.config._attn_implementation != self.backend:
            set_decoder_attention(self.model, self.decoder, self.backend)
