"""``PreferenceDataModule``: Pick-a-Pic-style preference pairs (or unpaired labelled images for
Diffusion-KTO) with a pluggable timestep sampler."""

from __future__ import annotations

import os
from typing import Any

import datasets
import torch
from datasets.exceptions import DatasetGenerationError
from lightning.pytorch import LightningDataModule

from lightning_refdpo.data.draws import PairDraws
from lightning_refdpo.data.latent_cache import (
    CachedPairs,
    CachedPreferenceCollator,
    load_empty_prompt,
    load_latent_split,
)
from lightning_refdpo.data.preference import (
    PairTransform,
    PreferenceCollator,
    PreferencePairs,
    check_labels,
    check_schema,
    drop_ties,
)
from lightning_refdpo.data.resumable import ResumableDataLoader, ResumableSampler, resumable_loader
from lightning_refdpo.data.streaming import EpochDataLoader, StreamingPreferencePairs
from lightning_refdpo.data.unpaired import LabeledImageCouples, check_unpaired_schema
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
        max_train_samples, max_validation_samples: keep N pairs: ties dropped, then a shuffle with
            ``seed`` and the first N (Diffusion-DPO's ``shuffle(seed).select(range(N))``); when
            streaming, the first N pairs of the stream that are not ties.
        resolution: square training resolution in pixels (512 for SD1.5).
        random_crop: random instead of centre crop, drawn for each image of a pair.
        random_flip: horizontal flip with p = 0.5, drawn for each image of a pair (as Diffusion-DPO
            does); shared_flip: one flip for both images of a pair.
        proportion_empty_prompts: caption dropout (0.2 in the Diffusion-DPO recipe).
        timestep_sampler: draws the training timesteps (default ``UniformTimestepSampler(1000)``).
        train_batch_size: pairs per device and step; val_batch_size: pairs per validation step.
        num_workers, pin_memory: ``DataLoader`` options.
        latent_cache: a folder written by ``lightning-refdpo cache``: train from cached VAE
            posteriors and text embeddings instead of images (see ``data/latent_cache.py``).
        latent_columns: the two columns of a preference set that ships each image's VAE latent
            (e.g. ``[latents_0, latents_1]``, unscaled, as the generator produced them): train and
            validate on those exact latents instead of encoding the images (no crop or flip).
        unpaired: train on unpaired labelled images (``caption``, ``image``, ``label``: 1 desirable, 0
            undesirable) instead of pairs, read as couples of one image of each kind
            (``data/unpaired.py``); for ``model.loss_type: kto``. ``max_*_samples`` count images.
            Not with ``latent_cache``, ``latent_columns`` or ``streaming``.
        seed: seed of the shuffle and of every pair's draws (``data/draws.py``); ``None`` takes the
            seed of ``seed_everything``, as Lightning's own distributed sampler does.
        streaming: stream the train split (``load_dataset(..., streaming=True)``, each rank its
            share, see ``data/streaming.py``) instead of downloading it whole; shuffled in a buffer
            of ``shuffle_buffer_size`` pairs. A resumed run restarts the stream at its epoch's start.

    Training is resumable mid-epoch and reproducible on any number of ranks and workers: each
    pair's crop, flip, caption dropout, ``t`` and noise come from a seed of ``(seed, epoch, index)``,
    and the train loader's position is checkpointed (``data/resumable.py``).
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
        shared_flip: bool = False,
        proportion_empty_prompts: float = 0.2,
        timestep_sampler: TimestepSampler | None = None,
        train_batch_size: int = 1,
        val_batch_size: int = 4,
        num_workers: int = 4,
        pin_memory: bool = True,
        latent_cache: str | None = None,
        latent_columns: tuple[str, str] | None = None,
        seed: int | None = None,
        streaming: bool = False,
        shuffle_buffer_size: int = 1000,
        unpaired: bool = False,
    ) -> None:
        super().__init__()
        options = {"latent_cache": latent_cache, "latent_columns": latent_columns, "streaming": streaming}
        clashing = next((name for name, value in options.items() if unpaired and value), None)
        if clashing:
            raise ValueError(
                f"data.unpaired couples labelled images as it loads them, which data.{clashing} does not "
                f"support; drop data.{clashing}"
            )
        if resolution < 8 or resolution % 8:
            raise ValueError(f"data.resolution must be a positive multiple of 8; got {resolution}")
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(
                f"data.proportion_empty_prompts must be in [0, 1]; got {proportion_empty_prompts}"
            )
        for name, value in (("train_batch_size", train_batch_size), ("val_batch_size", val_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1; got {value}")
        if latent_columns is not None:
            if len(latent_columns) != 2:
                raise ValueError(
                    f"data.latent_columns names the latents of image 0 and image 1 (two columns); got {latent_columns}"
                )
            if random_crop or random_flip:
                raise ValueError(
                    "data.latent_columns trains on the shipped latents, which cannot be cropped or flipped: "
                    "set data.random_crop and data.random_flip to false"
                )
        self.save_hyperparameters(ignore=["timestep_sampler"])
        self.timestep_sampler = timestep_sampler or UniformTimestepSampler(1000)
        self.train_batch_size = train_batch_size
        self.splits: dict[str, Any] = {}

    @property
    def seed(self) -> int:
        return (
            self.hparams.seed if self.hparams.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        )

    def training_draws(self) -> PairDraws:
        return PairDraws(self.timestep_sampler, self.hparams.proportion_empty_prompts, self.seed)

    def load_pairs(
        self, split: str, limit: int | None, transform: PairTransform, draws: PairDraws | None = None
    ) -> PreferencePairs:
        """The preference pairs of ``split``: schema checked, ties dropped, and with ``limit`` the
        first ``limit`` pairs of a shuffle with :attr:`seed`."""
        dataset = self.load_split(split)
        check_schema(dataset, split, self.latent_columns or (), self.split_source(split))
        check_labels(dataset, split)
        dataset = drop_ties(dataset, split)
        if limit is not None:
            dataset = dataset.shuffle(seed=self.seed).select(range(min(limit, len(dataset))))
        return PreferencePairs(dataset, transform, draws, self.latent_columns)

    def load_couples(
        self, split: str, limit: int | None, transform: PairTransform, draws: PairDraws | None = None
    ) -> LabeledImageCouples:
        """The unpaired labelled images of ``split`` as couples (``data/unpaired.py``): schema and
        labels checked, and with ``limit`` the first ``limit`` images of a shuffle with :attr:`seed`."""
        dataset = self.load_split(split)
        check_unpaired_schema(dataset, split)
        if limit is not None:
            dataset = dataset.shuffle(seed=self.seed).select(range(min(limit, len(dataset))))
        return LabeledImageCouples(dataset, transform, split, draws, self.seed)

    @property
    def latent_columns(self) -> tuple[str, str] | None:
        return tuple(self.hparams.latent_columns) if self.hparams.latent_columns else None

    def stream_pairs(
        self, split: str, limit: int | None, transform: PairTransform, draws: PairDraws
    ) -> StreamingPreferencePairs:
        """This rank's share of ``split`` streamed (ties dropped, then the first ``limit`` pairs)."""
        trainer = self.trainer
        return StreamingPreferencePairs(
            self.load_split(split, streaming=True),
            PreferencePairs(None, transform, draws, self.latent_columns),
            split,
            self.seed,
            limit=limit,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            shuffle_buffer_size=self.hparams.shuffle_buffer_size,
            source=self.split_source(split),
        )

    def split_source(self, split: str) -> str:
        """Where ``split`` is read from: its files in ``data_files``, else the dataset's name."""
        hp = self.hparams
        return str((hp.data_files or {}).get(split, hp.dataset_name))

    def load_split(self, split: str, streaming: bool = False) -> Any:
        """``load_dataset`` of ``split``, from its own files only when ``data_files`` names them
        (``datasets`` builds every split of ``data_files`` with the first one's columns, so a split
        that lacks a column would fail as unreadable instead of being named by ``check_schema``);
        an empty or unreadable file (zero bytes, not parquet) is refused naming the split and its files."""
        hp = self.hparams
        options = {"streaming": True} if streaming else {"cache_dir": hp.cache_dir}
        data_files = hp.data_files
        if isinstance(data_files, dict) and split in data_files:
            data_files = {split: data_files[split]}
        try:
            return datasets.load_dataset(
                hp.dataset_name,
                hp.dataset_config_name,
                data_files=data_files,
                split=split,
                revision=hp.revision,
                **options,
            )
        except (ValueError, DatasetGenerationError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"preference split {split!r} ({self.split_source(split)}) is empty or unreadable: {reason}"
            ) from None

    def setup(self, stage: str) -> None:
        hp = self.hparams
        wanted = {
            "train": stage == "fit",
            "validation": stage in ("fit", "validate") and bool(hp.validation_split),
        }
        for name in (n for n, needed in wanted.items() if needed and n not in self.splits):
            draws = self.training_draws() if name == "train" else None
            if hp.latent_cache:
                self.splits[name] = CachedPairs(load_latent_split(hp.latent_cache, name), draws)
            elif name == "train":
                transform = PairTransform(hp.resolution, hp.random_crop, hp.random_flip, hp.shared_flip)
                load = (
                    self.load_couples
                    if hp.unpaired
                    else self.stream_pairs
                    if hp.streaming
                    else self.load_pairs
                )
                self.splits[name] = load(hp.train_split, hp.max_train_samples, transform, draws)
            else:
                transform = PairTransform(hp.resolution, random_crop=False, random_flip=False)
                load = self.load_couples if hp.unpaired else self.load_pairs
                self.splits[name] = load(hp.validation_split, hp.max_validation_samples, transform)

    def collator(self) -> PreferenceCollator | CachedPreferenceCollator:
        """The batch collator (the training pairs carry their own draws)."""
        if self.hparams.latent_cache:
            return CachedPreferenceCollator(load_empty_prompt(self.hparams.latent_cache))
        return PreferenceCollator()

    def loader_options(self) -> dict[str, Any]:
        """``DataLoader`` arguments shared by the train and validation loaders."""
        return {
            "collate_fn": self.collator(),
            "num_workers": self.hparams.num_workers,
            "pin_memory": self.hparams.pin_memory and torch.cuda.is_available(),
        }

    def train_dataloader(self) -> ResumableDataLoader | EpochDataLoader:
        trainer = self.trainer
        if isinstance(self.splits["train"], StreamingPreferencePairs):
            return EpochDataLoader(
                self.splits["train"],
                trainer,
                batch_size=self.train_batch_size,
                drop_last=True,
                **self.loader_options(),
            )
        return resumable_loader(
            self.splits["train"],
            self.train_batch_size,
            self.seed,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            **self.loader_options(),
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a training batch as consumed when it reaches the step (not when prefetched)."""
        if self.trainer is not None and self.trainer.training:
            sampler = getattr(self.trainer.train_dataloader, "sampler", None)
            if isinstance(sampler, ResumableSampler):
                sampler.batches_consumed += 1
        return batch

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        if "validation" not in self.splits:
            return []
        return torch.utils.data.DataLoader(
            self.splits["validation"],
            batch_size=self.hparams.val_batch_size,
            persistent_workers=self.hparams.num_workers > 0,
            **self.loader_options(),
        )
