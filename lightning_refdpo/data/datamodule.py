"""``PreferenceDataModule``: Pick-a-Pic-style preference pairs with a pluggable timestep sampler."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from lightning.pytorch import LightningDataModule

from lightning_refdpo.data.latent_cache import CachedPreferenceCollator, load_empty_prompt, load_latent_split
from lightning_refdpo.data.preference import (
    PairTransform,
    PreferenceCollator,
    PreferencePairs,
    check_schema,
    drop_ties,
)
from lightning_refdpo.timesteps import TimestepSampler, UniformTimestepSampler


class PreferenceDataModule(LightningDataModule):
    """Preference pairs from the hub or local files, with the training timesteps attached.

    The timestep sampler lives here, not in the model: the loader draws each pair's ``t`` (uniform
    for Diffusion-DPO, ``DiscountedTimestepSampler`` for the timestep-aware method), so the
    sampling distribution is a data choice that a config swaps without touching the model.

    Args:
        dataset_name: ``load_dataset`` path: a hub id (default Pick-a-Pic v2) or a builder name
            such as ``parquet``, ``arrow`` or ``json`` together with ``data_files``.
        data_files: files per split for local builders, e.g. ``{"train": "train.parquet"}``.
        dataset_config_name, revision, cache_dir: passed to ``load_dataset``.
        train_split, validation_split: split names (``validation_split: null`` disables validation).
        max_train_samples, max_validation_samples: keep only the first N pairs (after dropping ties).
        resolution: square training resolution in pixels (512 for SD1.5).
        random_crop: random instead of centre crop; random_flip: horizontal flip with p = 0.5.
        proportion_empty_prompts: caption dropout (0.2 in the Diffusion-DPO recipe).
        timestep_sampler: draws the training timesteps (default ``UniformTimestepSampler(1000)``).
        train_batch_size: pairs per device and step; val_batch_size: pairs per validation step.
        num_workers, pin_memory: ``DataLoader`` options.
        latent_cache: a folder written by ``lightning-refdpo cache``: train from cached VAE
            posteriors and text embeddings instead of images (see ``data/latent_cache.py``).
    """

    def __init__(
        self,
        dataset_name: str = "yuvalkirstain/pickapic_v2",
        data_files: dict[str, str | list[str]] | None = None,
        dataset_config_name: str | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        train_split: str = "train",
        validation_split: str | None = "validation",
        max_train_samples: int | None = None,
        max_validation_samples: int | None = None,
        resolution: int = 512,
        random_crop: bool = False,
        random_flip: bool = True,
        proportion_empty_prompts: float = 0.2,
        timestep_sampler: TimestepSampler | None = None,
        train_batch_size: int = 1,
        val_batch_size: int = 4,
        num_workers: int = 4,
        pin_memory: bool = True,
        latent_cache: str | None = None,
    ) -> None:
        super().__init__()
        if resolution < 8 or resolution % 8:
            raise ValueError(f"data.resolution must be a positive multiple of 8; got {resolution}")
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(
                f"data.proportion_empty_prompts must be in [0, 1]; got {proportion_empty_prompts}"
            )
        for name, value in (("train_batch_size", train_batch_size), ("val_batch_size", val_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1; got {value}")
        self.save_hyperparameters(ignore=["timestep_sampler"])
        self.timestep_sampler = timestep_sampler or UniformTimestepSampler(1000)
        self.train_batch_size = train_batch_size
        self.splits: dict[str, Any] = {}

    def load_pairs(self, split: str, limit: int | None, transform: PairTransform) -> PreferencePairs:
        """The preference pairs of ``split`` (schema checked, ties dropped, first ``limit`` kept)."""
        hp = self.hparams
        dataset = datasets.load_dataset(
            hp.dataset_name,
            hp.dataset_config_name,
            data_files=hp.data_files,
            split=split,
            revision=hp.revision,
            cache_dir=hp.cache_dir,
        )
        check_schema(dataset, split)
        dataset = drop_ties(dataset, split)
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        return PreferencePairs(dataset, transform)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        wanted = {
            "train": stage == "fit",
            "validation": stage in ("fit", "validate") and bool(hp.validation_split),
        }
        for name in (n for n, needed in wanted.items() if needed and n not in self.splits):
            if hp.latent_cache:
                self.splits[name] = load_latent_split(hp.latent_cache, name)
            elif name == "train":
                transform = PairTransform(hp.resolution, hp.random_crop, hp.random_flip)
                self.splits[name] = self.load_pairs(hp.train_split, hp.max_train_samples, transform)
            else:
                transform = PairTransform(hp.resolution, random_crop=False, random_flip=False)
                self.splits[name] = self.load_pairs(hp.validation_split, hp.max_validation_samples, transform)

    def collator(self, train: bool) -> PreferenceCollator | CachedPreferenceCollator:
        """The batch collator: timesteps and caption dropout for training only."""
        sampler = self.timestep_sampler if train else None
        dropout = self.hparams.proportion_empty_prompts if train else 0.0
        if self.hparams.latent_cache:
            return CachedPreferenceCollator(load_empty_prompt(self.hparams.latent_cache), sampler, dropout)
        return PreferenceCollator(sampler, dropout)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(
            self.splits["train"], self.train_batch_size, self.collator(train=True), shuffle=True
        )

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        if "validation" not in self.splits:
            return []
        return self._loader(
            self.splits["validation"], self.hparams.val_batch_size, self.collator(train=False), shuffle=False
        )

    def _loader(
        self, dataset: Any, batch_size: int, collate: Any, shuffle: bool
    ) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.hparams.num_workers > 0,
            drop_last=shuffle,
        )
