"""Lightning's progress bars with totals that make sense for runs limited by ``max_steps``.

Lightning shows ``Epoch 7/-2`` (``max_epochs - 1`` with ``max_epochs = -1``) and, after a resume in
the middle of an epoch, ``12/3`` (the batch index of the epoch against the steps left) or ``9/?``.
Here the bar counts the batches of the epoch against the epoch's length and names the epoch alone.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


class _EpochTotals:
    """What both bars change: the total, and the set-up after a mid-epoch resume."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.num_training_batches

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Also set up the epoch's bar when resuming mid-epoch, where Lightning skips
        ``on_train_epoch_start`` (the bar would have no total and no epoch)."""
        super().on_train_start(trainer, pl_module)
        if trainer.fit_loop.restarted_mid_epoch:
            self.on_train_epoch_start(trainer, pl_module)


class EpochTQDMProgressBar(_EpochTotals, TQDMProgressBar):
    """``TQDMProgressBar`` counting each epoch's batches against the epoch's length."""


class EpochRichProgressBar(_EpochTotals, RichProgressBar):
    """``RichProgressBar`` counting each epoch's batches against the epoch's length, with no
    ``/max_epochs`` when the run is limited by steps."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


def sane_progress_bar(bar: ProgressBar | None) -> ProgressBar | None:
    """The replacement for Lightning's default bar (exactly ``TQDMProgressBar`` or
    ``RichProgressBar`` with default settings); ``None`` to keep ``bar`` (a configured bar)."""
    if type(bar) is RichProgressBar:
        return EpochRichProgressBar()
    if type(bar) is TQDMProgressBar:
        return EpochTQDMProgressBar()
    return None
