"""Activation checkpointing of transformer blocks: none, every block (full), or every k-th block."""
from __future__ import annotations

from typing import Literal

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


ACMode = Literal["none", "full", "every_k"]


def apply_activation_checkpoint(model: nn.Module, mode: str, every: int = 2) -> int:
    """Wrap blocks in place; returns how many were wrapped. The k-th rule counts global layer ids
    so that a pipeline stage checkpoints the same blocks the whole model would."""
    if mode == "none":
        return 0
    if mode == "every_k" and every < 1:
        raise ValueError(f"parallel.activation_checkpoint_every: must be at least 1, got {every}")
    wrapped = 0
    for name, block in list(model.layers.items()):
        if mode == "full" or (mode == "every_k" and int(name) % every == 0):
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
            wrapped += 1
    return wrapped
