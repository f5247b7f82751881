"""``lightning-refdpo``: LightningCLI (``fit``, ``validate``, ``test``, ``predict``) plus ``cache``,
``evaluate`` and ``export``.

    lightning-refdpo fit --config configs/sd15_refdpo.yaml
    lightning-refdpo fit --config configs/tiny.yaml --trainer.max_steps 4
    lightning-refdpo evaluate outputs/.../last.ckpt --prompt_sets '[pickapic_v2_test, partiprompts, hpdv2]'
    lightning-refdpo export --ckpt_path outputs/.../last.ckpt --output exports/refdpo [--pipeline true]

Model and data are given by ``class_path`` so a subclass from another project plugs in unchanged.
"""

from __future__ import annotations

import argparse
import sys

from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.cli import LightningCLI

from lightning_refdpo.data import PreferenceDataModule
from lightning_refdpo.module import DiffusionDPOModule


def main(args: list[str] | None = None) -> LightningCLI | dict:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["cache"]:
        return cache_command(argv[1:])
    if argv[:1] == ["evaluate"]:
        from jsonargparse import CLI

        from lightning_refdpo.evaluation import evaluate_model

        return CLI(evaluate_model, args=argv[1:])
    if argv[:1] == ["export"]:
        from jsonargparse import CLI

        from lightning_refdpo.export import export_checkpoint

        return CLI(export_checkpoint, args=argv[1:], as_positional=False)
    return build_cli(args)


def build_cli(args: list[str] | None, run: bool = True) -> LightningCLI:
    """The training CLI over any ``DiffusionDPOModule`` and ``PreferenceDataModule`` subclass;
    ``run=False`` only builds the model, data and trainer of ``args``."""
    return RefDPOCLI(
        DiffusionDPOModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        run=run,
        args=args,
    )


class RefDPOCLI(LightningCLI):
    """``LightningCLI`` whose ``fit`` also checkpoints an interrupted run (Ctrl-C, SIGTERM, an error
    such as ``NonFiniteLossError``) to ``<default_root_dir>/on_exception.ckpt`` with Lightning's
    ``OnExceptionCheckpoint``; continue it with ``--ckpt_path``. On SLURM, Lightning's own
    ``SLURMEnvironment`` (auto-detected, ``auto_requeue``) saves and requeues on the SIGUSR1 that
    ``scripts/slurm/refdpo.sbatch`` asks for."""

    def before_fit(self) -> None:
        if not any(isinstance(c, OnExceptionCheckpoint) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(OnExceptionCheckpoint(self.trainer.default_root_dir))


def cache_command(argv: list[str]) -> str:
    """``lightning-refdpo cache --config CONFIG --output DIR [--cache_batch_size N]``: encode the
    config's train and validation pairs with its model's VAE and text encoder into a latent cache;
    train from it with ``--data.init_args.latent_cache DIR``."""
    from lightning_refdpo.data.latent_cache import write_latent_cache
    from lightning_refdpo.data.preference import PairTransform

    own = argparse.ArgumentParser(prog="lightning-refdpo cache", add_help=False)
    own.add_argument("--output", required=True)
    own.add_argument("--cache_batch_size", type=int, default=8)
    args, rest = own.parse_known_args(argv)
    cli = build_cli(rest, run=False)
    data, module = cli.datamodule, cli.model.to(cli.trainer.strategy.root_device).eval()
    transform = PairTransform(data.hparams.resolution, random_crop=False, random_flip=False)
    splits = {"train": data.load_pairs(data.hparams.train_split, data.hparams.max_train_samples, transform)}
    if data.hparams.validation_split:
        splits["validation"] = data.load_pairs(
            data.hparams.validation_split, data.hparams.max_validation_samples, transform
        )
    path = write_latent_cache(module, splits, args.output, args.cache_batch_size)
    print(f"latent cache written to {path}; train with --data.init_args.latent_cache {path}")
    return str(path)


if __name__ == "__main__":
    main()
