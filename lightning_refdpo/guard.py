"""``TrainingGuard``: what a long run must not silently do, train on NaNs or on almost no data.

Both decisions are taken on counts summed over ranks, so every rank skips (or stops) together,
as DDP needs.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` training steps in a row had a NaN or infinite loss."""


class UndecodablePairsError(RuntimeError):
    """Raised when more than ``max_skipped_share`` of the training pairs could not be decoded."""


class TrainingGuard:
    """Counts non-finite steps and undecodable pairs of one run (its counts go into checkpoints).

    Args:
        max_nonfinite_steps: this many skipped non-finite steps in a row stop the run.
        max_skipped_share: more than this share of undecodable training pairs stops the run.
    """

    def __init__(self, max_nonfinite_steps: int, max_skipped_share: float) -> None:
        self.max_nonfinite_steps = max_nonfinite_steps
        self.max_skipped_share = max_skipped_share
        self.nonfinite_steps = self.nonfinite_in_a_row = 0
        self.pairs_loaded = self.pairs_skipped = 0

    def count_pairs(self, loaded: int, skipped: int) -> None:
        self.pairs_loaded += loaded + skipped
        self.pairs_skipped += skipped

    def skip_nonfinite(self, loss: torch.Tensor, strategy: Any, step: int) -> bool:
        """Whether to skip this step: the loss is non-finite on at least one rank. Raises
        :class:`NonFiniteLossError` after ``max_nonfinite_steps`` skipped steps in a row."""
        if not on_any_rank(~torch.isfinite(loss.detach()), strategy, loss.device):
            self.nonfinite_in_a_row = 0
            return False
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss was NaN or infinite in {self.nonfinite_in_a_row} training steps in a row (step "
                f"{step}); stopping. Lower model.learning_rate or model.beta, check the data, or use "
                "frozen_dtype/precision with more range (bf16 or fp32)."
            )
        return True

    def check_skipped_pairs(self, strategy: Any, device: torch.device) -> None:
        """Report the undecodable training pairs and raise :class:`UndecodablePairsError` when they
        exceed ``max_skipped_share`` of the pairs loaded."""
        counts = torch.tensor([self.pairs_skipped, self.pairs_loaded], dtype=torch.float64, device=device)
        skipped, loaded = (int(x) for x in strategy.reduce(counts, reduce_op="sum").tolist())
        if not skipped:
            return
        message = f"{skipped} of {loaded} training pairs could not be decoded and were skipped"
        if skipped > self.max_skipped_share * loaded:
            raise UndecodablePairsError(
                f"{message}: more than model.max_skipped_share={self.max_skipped_share} of them. "
                "Check the image columns (jpg_0, jpg_1) of the training data."
            )
        rank_zero_warn(f"{message} (train/skipped_pairs)")


def on_any_rank(flag: bool | torch.Tensor, strategy: Any, device: torch.device) -> bool:
    """Whether ``flag`` holds on at least one rank: one value summed over ranks, the same on all."""
    flag = torch.as_tensor(flag, dtype=torch.float32, device=device)
    return float(strategy.reduce(flag, reduce_op="sum")) > 0
