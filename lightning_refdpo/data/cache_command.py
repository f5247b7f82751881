"""``lightning-refdpo cache``: encode a config's preference pairs into a latent cache
(``data/latent_cache.py``), with the trainer, model and data that the config builds."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningModule, Trainer

from lightning_refdpo.data.datamodule import PreferenceDataModule
from lightning_refdpo.data.latent_cache import write_latent_cache
from lightning_refdpo.data.preference import PairTransform


def cache_latents(
    trainer: Trainer,
    model: LightningModule,
    datamodule: PreferenceDataModule,
    output: str,
    cache_batch_size: int = 8,
) -> Path:
    """Encode the train and validation pairs of ``datamodule`` with the VAE and text encoder of
    ``model``, on the device of ``trainer``, into a latent cache; train from it with
    ``--data.init_args.latent_cache OUTPUT``.

    Args:
        trainer: the trainer of the config (its strategy's device encodes).
        model: the module (a ``DiffusionDPOModule``) whose backbone's VAE and text encoders encode.
        datamodule: the preference pairs (``train_split``, ``validation_split``, their limits).
        output: folder of the latent cache.
        cache_batch_size: pairs encoded at a time.
    """
    hp = datamodule.hparams
    if hp.get("unpaired"):
        raise ValueError(
            "data.unpaired images are coupled anew every epoch and cannot be cached; train them uncached"
        )
    transform = PairTransform(hp.resolution, random_crop=False, random_flip=False)
    splits = {"train": datamodule.load_pairs(hp.train_split, hp.max_train_samples, transform)}
    if hp.validation_split:
        splits["validation"] = datamodule.load_pairs(
            hp.validation_split, hp.max_validation_samples, transform
        )
    module = model.to(trainer.strategy.root_device).eval()
    path = write_latent_cache(module.backbone, splits, output, cache_batch_size)
    print(f"latent cache written to {path}; train with --data.init_args.latent_cache {path}")
    return path
