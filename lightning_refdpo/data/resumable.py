"""A training loader that Lightning can resume in the middle of an epoch.

Lightning saves the ``state_dict`` of every train loader that has one with the fit loop and hands
it back to ``load_state_dict`` on resume (``CombinedLoader._state_dicts``). Ours records the epoch
and how many batches training has consumed in it; a resumed loader skips those batches by index,
without loading them, so the run continues with the next unseen batch of the same shuffle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle of ``seed + epoch``, each rank its slice) that skips the first
    ``skip_batches`` batches of the epoch it was resumed in.

    Being a ``DistributedSampler``, Lightning keeps it (it only injects one into loaders without)
    and calls :meth:`set_epoch` at each epoch; with one process it is a seeded shuffle. The epoch is
    passed on to a dataset with ``set_epoch`` (the pairs' per-epoch draws, see ``draws.py``).
    """

    def __init__(self, dataset: Any, batch_size: int, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.batches_consumed = 0
        self.resume_epoch = -1
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.batches_consumed = 0
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.epoch == self.resume_epoch:
            indices = indices[self.skip_batches * self.batch_size :]
        return iter(indices)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_epoch = self.epoch = state["epoch"]
        self.skip_batches = self.batches_consumed = state["batches_consumed"]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position Lightning checkpoints.

    The owner counts consumed batches (``sampler.batches_consumed += 1`` when a batch reaches
    training, not when it is prefetched: ``PreferenceDataModule.on_before_batch_transfer``).
    """

    sampler: ResumableSampler

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def resumable_loader(
    dataset: Any, batch_size: int, seed: int, num_replicas: int, rank: int, **kwargs: Any
) -> ResumableDataLoader:
    """A shuffling, ``drop_last`` training loader over ``dataset`` for rank ``rank`` of ``num_replicas``."""
    sampler = ResumableSampler(dataset, batch_size, num_replicas=num_replicas, rank=rank, seed=seed)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
