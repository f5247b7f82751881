"""Start-up checks of the module's settings: an impossible value is refused before any weights
load, with the key and the fix."""

from __future__ import annotations

import math

import torch

from lightning_refdpo.losses import LOSS_TYPES

ATTENTION = ("sdpa", "xformers", "eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_module_settings(
    loss_type: str,
    beta: float,
    label_smoothing: float,
    ipo_tau: float,
    lora_rank: int | None,
    learning_rate: float,
    frozen_dtype: str | None,
    attention: str,
    max_nonfinite_steps: int,
    max_skipped_share: float,
) -> None:
    """Refuse impossible ``model.*`` settings (NaN and infinities included)."""
    numbers = {
        "beta": beta,
        "learning_rate": learning_rate,
        "label_smoothing": label_smoothing,
        "ipo_tau": ipo_tau,
    }
    for name, value in numbers.items():
        if not math.isfinite(value):
            raise ValueError(f"model.{name} must be a finite number; got {value}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"model.loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"model.beta must be > 0 (Diffusion-DPO uses 5000); got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"model.label_smoothing must be in [0, 0.5); got {label_smoothing}")
    if ipo_tau <= 0:
        raise ValueError(f"model.ipo_tau must be > 0; got {ipo_tau}")
    if lora_rank is not None and lora_rank < 1:
        raise ValueError(f"model.lora_rank must be >= 1, or null for full fine-tuning; got {lora_rank}")
    if learning_rate <= 0:
        raise ValueError(f"model.learning_rate must be > 0; got {learning_rate}")
    if frozen_dtype is not None and frozen_dtype not in DTYPES:
        raise ValueError(
            f"model.frozen_dtype must be one of {', '.join(DTYPES)} or null; got {frozen_dtype!r}"
        )
    if attention not in ATTENTION:
        raise ValueError(f"model.attention must be one of {', '.join(ATTENTION)}; got {attention!r}")
    if max_nonfinite_steps < 1:
        raise ValueError(f"model.max_nonfinite_steps must be >= 1; got {max_nonfinite_steps}")
    if not 0.0 <= max_skipped_share <= 1.0:
        raise ValueError(f"model.max_skipped_share must be in [0, 1]; got {max_skipped_share}")
