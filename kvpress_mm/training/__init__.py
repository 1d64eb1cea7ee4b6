"""Training mini_llava's projector on synthetic scenes (CPU, frozen tower and LM): see trainer.py / cli.py.

python -m kvpress_mm.train_projector --steps 500 --seed 0 --heldout 20
"""

from .data import Example, ExampleBuilder, collate, pick_qas
from .features import cached_features, pool_tokens, vision_features
from .heldout import evaluate_heldout, heldout_items
from .projector import StandardizedProjector, channel_stats, save_llava_projector
from .trainer import TrainConfig, lr_at, projector_loss, train

__all__ = [
    "Example",
    "ExampleBuilder",
    "StandardizedProjector",
    "TrainConfig",
    "cached_features",
    "channel_stats",
    "collate",
    "evaluate_heldout",
    "heldout_items",
    "lr_at",
    "pick_qas",
    "pool_tokens",
    "projector_loss",
    "save_llava_projector",
    "train",
    "vision_features",
]
