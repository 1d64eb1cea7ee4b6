"""A model adapter says where a family keeps its text decoder and how its prompt is labelled."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modality import modality_from_ids, modality_from_type_ids


@dataclass(frozen=True)
class ModelAdapter:
    """Facts about one model family; no behaviour that a strategy could see.

    decoder_path: dotted path from the top-level model to the text decoder (the module with .layers).
    image_token_attr / video_token_attr: config fields naming the placeholder ids (None: not used).
    type_ids_input: a forward input that already labels modality (Qwen-VL's mm_token_type_ids).
    """

    family: str
    model_types: tuple[str, ...]
    decoder_path: str
    image_token_attr: str | None = "image_token_id"
    video_token_attr: str | None = None
    type_ids_input: str | None = None

    @property
    def multimodal(self) -> bool:
        return self.image_token_attr is not None

    def decoder(self, model: torch.nn.Module) -> torch.nn.Module:
        module = model
        for name in self.decoder_path.split("."):
            module = getattr(module, name)
        return module

    def attention_modules(self, model: torch.nn.Module) -> dict[int, torch.nn.Module]:
        """layer_idx -> the decoder layer's self-attention module."""
        return {layer.self_attn.layer_idx: layer.self_attn for layer in self.decoder(model).layers}

    def sliding_layers(self, model: torch.nn.Module) -> frozenset[int]:
        """Layers with a sliding-window cache; they are left uncompressed."""
        layer_types = getattr(self.decoder(model).config, "layer_types", None) or ()
        return frozenset(i for i, kind in enumerate(layer_types) if kind != "full_attention")

    def token_ids(self, model: torch.nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(image placeholder ids, video placeholder ids) from the model's config."""
        config = model.config
        image = self._config_id(config, self.image_token_attr, required=True)
        video = self._config_id(config, self.video_token_attr, required=False)
        return image, video

    def _config_id(self, config, attr: str | None, required: bool) -> tuple[int, ...]:
        if attr is None:
            return ()
        value = getattr(config, attr, None)
        if value is None:
            if required:
                raise ValueError(
                    f"{self.family} model config has no {attr}: kvpress-mm cannot tell image tokens from text; "
                    f"set model.config.{attr} to the image placeholder token id"
                )
            return ()
        return (int(value),)

    def modality(self, model: torch.nn.Module, input_ids, attention_mask, inputs: dict) -> torch.Tensor:
        """[batch, seq] Modality labels for a prompt."""
        type_ids = inputs.get(self.type_ids_input) if self.type_ids_input else None
        if type_ids is not None:
            return modality_from_type_ids(type_ids, attention_mask)
        image, video = self.token_ids(model) if self.multimodal else ((), ())
        return modality_from_ids(input_ids, attention_mask, image, video)
