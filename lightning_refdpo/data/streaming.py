"""Training pairs streamed with ``datasets`` streaming (``load_dataset(..., streaming=True)``):
the full Pick-a-Pic v2 (hundreds of GB of parquet shards) is read shard by shard, never downloaded
whole. Each rank reads its share (``datasets.distributed.split_dataset_by_node``: whole shards when
their number divides by the world size, else every ``world_size``-th pair), and each data-loader
worker a share of that (``datasets`` splits the shards over workers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from datasets.distributed import split_dataset_by_node

from lightning_refdpo.data.preference import TIE, PreferencePairs, check_schema


class StreamingPreferencePairs(torch.utils.data.IterableDataset):
    """This rank's pairs of a streaming ``datasets.IterableDataset``: ties dropped, the first
    ``limit`` pairs kept (all with ``None``), shuffled in a buffer of ``shuffle_buffer_size`` pairs (seed ``seed + epoch``), decoded like ``pairs`` decodes.

    The ``i``-th pair that worker ``w`` of ``num_workers`` on rank ``r`` of ``world_size`` yields
    draws as pair ``(i * num_workers + w) * world_size + r`` of the epoch (``draws.py``).
    """

    def __init__(
        self,
        dataset: Any,
        pairs: PreferencePairs,
        split: str,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer_size: int = 1000,
        limit: int | None = None,
        source: str | None = None,
    ) -> None:
        if dataset.features is not None:
            check_schema(dataset, split, pairs.latent_columns or (), source)
        dataset = dataset.filter(lambda label: label != TIE, input_columns="label_0")
        if limit is not None:
            dataset = dataset.take(limit)
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        self.pairs = pairs
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.pairs.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, row in enumerate(self.dataset):
            yield self.pairs.pair(row, ((i * num_workers + worker) * self.world_size + self.rank))


class EpochDataLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` over :class:`StreamingPreferencePairs` that sets the stream's epoch from
    ``trainer.current_epoch`` whenever an epoch starts (Lightning sets the epoch of samplers only)."""

    def __init__(self, dataset: StreamingPreferencePairs, trainer: Any = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.trainer = trainer

    def __iter__(self) -> Any:
        self.dataset.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return super().__iter__()
