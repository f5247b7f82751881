"""Start-up checks of the module's settings: an impossible value is refused before any weights
load, with the key and the fix."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_refdpo.losses import LOSS_TYPES, LOSSES, LossOptions

ATTENTION = ("sdpa", "xformers", "eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_module_settings(
    loss_type: str,
    loss_options: dict[str, Any],
    winner_preserving_mu: float | None,
    lora_rank: int | None,
    learning_rate: float,
    frozen_dtype: str | None,
    attention: str,
    max_nonfinite_steps: int,
    max_skipped_share: float,
) -> None:
    """Refuse impossible ``model.*`` settings (NaN and infinities included); ``loss_options`` are
    the keyword arguments of :class:`~lightning_refdpo.losses.LossOptions`."""
    if not math.isfinite(learning_rate):
        raise ValueError(f"model.learning_rate must be a finite number; got {learning_rate}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"model.loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    try:
        LossOptions(**loss_options)
    except ValueError as err:
        raise ValueError(f"model.{err}") from None
    if winner_preserving_mu is not None:
        if not 0.0 <= winner_preserving_mu <= 1.0:
            raise ValueError(
                f"model.winner_preserving_mu must be in [0, 1], or null (off); got {winner_preserving_mu}"
            )
        if not LOSSES[loss_type].pairwise:
            pairwise = ", ".join(name for name, loss in LOSSES.items() if loss.pairwise)
            raise ValueError(
                f"model.winner_preserving_mu scales the loser branch of a pairwise loss ({pairwise}); "
                f"loss_type {loss_type!r} has none: set winner_preserving_mu: null"
            )
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
