"""The run lifecycle's checkpoint rules and progress bars, without a training run."""

import os
from types import SimpleNamespace

import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from lightning_refdpo.callbacks.checkpointing import ExceptionCheckpoint, latest_checkpoint
from lightning_refdpo.callbacks.progress import EpochRichProgressBar, EpochTQDMProgressBar, sane_progress_bar


def write(path, global_step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": global_step}, path)


class Saver(SimpleNamespace):
    """What ``ExceptionCheckpoint`` uses of a trainer: its step and ``save_checkpoint``."""

    def save_checkpoint(self, path) -> None:
        write(path, self.global_step)


def test_exception_checkpoint_needs_a_step_of_this_run_and_never_goes_back(tmp_path):
    callback = ExceptionCheckpoint(tmp_path)
    trainer = Saver(global_step=0)
    callback.on_exception(trainer, None, RuntimeError())
    assert not callback.ckpt_path.exists(), "nothing before the run starts"
    callback.on_train_start(trainer, None)
    callback.on_exception(trainer, None, RuntimeError())
    assert not callback.ckpt_path.exists(), "nothing before the first optimizer step"
    write(callback.ckpt_path, 10)
    trainer.global_step = 5
    callback.on_exception(trainer, None, RuntimeError())
    assert torch.load(callback.ckpt_path)["global_step"] == 10, "a later step is kept"
    trainer.global_step = 12
    callback.on_exception(trainer, None, RuntimeError())
    assert torch.load(callback.ckpt_path)["global_step"] == 12


def test_latest_checkpoint_is_the_highest_step_then_the_newest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    write(tmp_path / "on_exception.ckpt", 6)
    write(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", 8)
    write(tmp_path / "lightning_logs/version_1/checkpoints/last.ckpt", 2)
    (tmp_path / "broken.ckpt").write_text("not a checkpoint")
    assert latest_checkpoint(tmp_path) == tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    write(tmp_path / "hpc_ckpt_1.ckpt", 8)
    os.utime(tmp_path / "hpc_ckpt_1.ckpt", (2e9, 2e9))
    assert latest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"


def test_progress_bars_count_the_epoch_and_name_no_epoch_total_of_minus_one():
    trainer = SimpleNamespace(max_epochs=-1, max_steps=12, global_step=9, num_training_batches=16)
    bars = [sane_progress_bar(TQDMProgressBar()), sane_progress_bar(RichProgressBar())]
    assert [type(b) for b in bars] == [EpochTQDMProgressBar, EpochRichProgressBar]
    for bar in bars:
        bar._trainer = trainer
        assert bar.total_train_batches == 16, "the epoch's length, not min(16, steps left)"
    assert bars[1]._get_train_description(7).strip() == "Epoch 7"
    assert sane_progress_bar(bars[0]) is None, "a configured bar is kept"
