"""The run lifecycle's checkpoints: after an interruption, at the run's last step, and which one to resume.

``lightning-refdpo fit`` adds :class:`ExceptionCheckpoint` and :class:`FinalStepCheckpoint` to every
run; :func:`latest_checkpoint` is what ``--ckpt_path last`` resumes from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_refdpo.checkpoint import CheckpointError, load_checkpoint

EXCEPTION_CHECKPOINT = "on_exception.ckpt"


def checkpoint_step(path: str | Path, unsafe_unpickle: bool = False) -> int:
    """The ``global_step`` saved in checkpoint ``path`` (memory-mapped, so cheap); -1 if it is absent
    or unreadable. A checkpoint that weights-only loading refuses raises
    :class:`~lightning_refdpo.checkpoint.CheckpointError` (see :func:`~lightning_refdpo.checkpoint.load_checkpoint`)."""
    try:
        return int(load_checkpoint(path, unsafe_unpickle)["global_step"])
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, EOFError, ValueError):
        return -1


def latest_checkpoint(root: str | Path, unsafe_unpickle: bool = False) -> Path | None:
    """The checkpoint under ``root`` (recursively) with the highest ``global_step``, the newest file on
    a tie: what ``--ckpt_path last`` resumes. ``None`` when there is none. Unreadable files (cut
    short) are passed over; a file that weights-only loading refuses stops the search
    (:class:`~lightning_refdpo.checkpoint.CheckpointError`): its step cannot be read without
    unpickling it."""
    candidates = [p for p in Path(root).rglob("*.ckpt") if p.is_file()]
    ranked = [(checkpoint_step(p, unsafe_unpickle), p.stat().st_mtime, p) for p in candidates]
    ranked = [r for r in ranked if r[0] >= 0]
    return max(ranked, key=lambda r: r[:2])[2] if ranked else None


class ExceptionCheckpoint(Callback):
    """Saves ``<dirpath>/on_exception.ckpt`` when ``fit`` stops on an exception (Ctrl-C, SIGTERM, an
    error such as ``NonFiniteLossError``), like Lightning's ``OnExceptionCheckpoint``, except that it

    - saves nothing unless this ``fit`` took an optimizer step (a run that fails at start-up, e.g. on
      a bad column or a checkpoint of another LoRA rank, leaves an earlier checkpoint alone), and
    - never replaces a checkpoint of a later step.

    It is deliberately not an ``OnExceptionCheckpoint``: Lightning resumes from any such callback's
    file whenever ``fit`` gets ``ckpt_path=None``, so an old interrupted run would be continued
    silently by a new one.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.ckpt_path = Path(dirpath) / EXCEPTION_CHECKPOINT
        self.start_step: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.start_step is None or trainer.global_step <= self.start_step:
            return
        try:
            saved = checkpoint_step(self.ckpt_path)
        except CheckpointError:  # not a checkpoint this package wrote: the run's state goes first
            saved = -1
        if saved > trainer.global_step:
            rank_zero_warn(
                f"not saving step {trainer.global_step} over {self.ckpt_path}, which holds step {saved}"
            )
            return
        trainer.save_checkpoint(self.ckpt_path)


class FinalStepCheckpoint(Callback):
    """Makes every ``ModelCheckpoint`` of the run keep ``last.ckpt`` (``save_last`` left unset becomes
    ``True``) and save after the run's last optimizer step (``trainer.max_steps``), which
    ``every_n_train_steps`` or a validation-triggered save would otherwise miss.

    The final save happens in ``on_train_batch_end``, where ``ModelCheckpoint`` saves its step
    checkpoints, so it resumes exactly like them; it must come after callbacks that change the
    models at that step (``ReferenceModelUpdate``), which the CLI ensures by adding it last.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for callback in self.model_checkpoints(trainer):
            if callback.save_last is None:
                callback.save_last = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.max_steps < 0 or trainer.global_step < trainer.max_steps:
            return
        for callback in self.model_checkpoints(trainer):
            if not callback._should_skip_saving_checkpoint(trainer):
                candidates = callback._monitor_candidates(trainer)
                callback._save_topk_checkpoint(trainer, candidates)
                callback._save_last_checkpoint(trainer, candidates)

    @staticmethod
    def model_checkpoints(trainer: Trainer) -> list[ModelCheckpoint]:
        return [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
