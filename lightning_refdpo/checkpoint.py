"""What a module checkpoint carries besides weights, and how keys of older checkpoints map to now."""

from __future__ import annotations

from typing import Any

import torch

LEGACY_KEY_PREFIXES = {"unet.": "policy.", "reference_unet.": "reference.model."}
"""State-dict prefixes of checkpoints written before the backbone / reference-strategy layout
(version 0.1), and their names now."""


def current_key(key: str) -> str:
    """A state-dict key of a checkpoint written before the backbone layout, under its name now."""
    for old, new in LEGACY_KEY_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def torch_rng_states() -> dict[str, Any]:
    """The global torch CPU and CUDA generator states, as tensors (a checkpoint that Lightning's
    ``weights_only`` loading accepts). The data draws no global randomness (``data/draws.py``);
    these cover what the model draws from it, e.g. LoRA dropout."""
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_torch_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["torch.cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
