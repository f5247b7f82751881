"""Test helpers shared by the module, callback and CLI tests."""

from __future__ import annotations

import json
import os
import signal as signal_module
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_refdpo import DiffusionDPOModule, PreferenceDataModule, ReferenceModelUpdate
from lightning_refdpo.data.latent_cache import CachedPreferenceCollator, load_empty_prompt, write_latent_cache
from lightning_refdpo.data.preference import PairTransform, PreferenceCollator
from lightning_refdpo.metrics import RewardScore


def not_installed(name: str) -> str:
    """Why ``name`` (``open_clip``, ``torchvision``) is not installed here: the skip reason of the
    tests that need it. Beside a CPU torch it cannot be (see README, Install)."""
    if torch.version.cuda is None:
        return (
            f"{name} is not installed: torchvision is kept out of the CPU install. The registry's "
            "torchvision 0.28.0 installs beside torch 2.13.0+cpu without another torch, but does not "
            "import (RuntimeError: operator torchvision::nms does not exist: it is built against the "
            "CUDA torch), and with it neither open_clip nor transformers' CLIPImageProcessor imports"
        )
    return f"{name} is not installed: pip install 'lightning-refdpo[hpsv2]' beside the CUDA torch"


def make_module(model_path: str, module_class: type = DiffusionDPOModule, **kwargs) -> DiffusionDPOModule:
    kwargs = {"learning_rate": 1e-3, "scale_lr": False, **kwargs}
    return module_class(pretrained_model_name_or_path=model_path, **kwargs)


def fit_tiny(
    module: DiffusionDPOModule,
    data_files: dict,
    max_steps: int,
    train_batch_size: int = 2,
    ckpt_path: str | None = None,
    data_options: dict | None = None,
    **trainer_kwargs,
) -> Trainer:
    """Fit ``module`` for ``max_steps`` on the 32 px parquet pairs of ``data_files`` (with the
    ``PreferenceDataModule`` options ``data_options``): CPU, no validation, logger or checkpoints
    unless ``trainer_kwargs`` say otherwise."""
    options = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "limit_val_batches": 0,
        **trainer_kwargs,
    }
    trainer = Trainer(
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )
    data = PreferenceDataModule(
        dataset_name="parquet",
        data_files=data_files,
        validation_split=None,
        resolution=32,
        num_workers=0,
        train_batch_size=train_batch_size,
        **(data_options or {}),
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def make_batch(batch_size: int = 2, resolution: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "caption": [f"prompt {i}" for i in range(batch_size)],
        "pixel_values": torch.rand(batch_size, 6, resolution, resolution, generator=g) * 2 - 1,
        "timesteps": torch.randint(0, 1000, (batch_size,), generator=g),
    }


def unet_weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


class Brightness(RewardScore):
    """Mean pixel value: a reward whose value on any image is known, for the evaluation plumbing."""

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


class SendSignal(Callback):
    """Sends ``signal`` to this process once ``at_step`` optimizer steps are done (an interrupted run)."""

    def __init__(self, at_step: int, signal: str = "SIGTERM") -> None:
        self.at_step = at_step
        self.signal = getattr(signal_module, signal)

    def on_train_batch_end(self, trainer: Trainer, *args) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signal)


class RunsCode:
    """An object that runs a shell command when it is unpickled (``os.system`` in ``__reduce__``), as
    a crafted checkpoint would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def crafted_checkpoint(source: str | Path, path: Path, marker: Path) -> Path:
    """The checkpoint ``source`` saved as ``path`` with an object in its hyperparameters that, when
    unpickled, creates the file ``marker``."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["note"] = RunsCode(f"touch {marker}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


class RecordRank(Callback):
    """Saves this rank's run to ``<default_root_dir>/rank<global_rank>.pt`` when training ends: each
    step's rank-local loss, timesteps and divergence-estimate seeds, the reference UNet's weights and
    the reference update's state."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.timesteps: list[list[int]] = []
        self.divergence_seeds: list[list[int]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))
        self.timesteps.append(batch["timesteps"].tolist())
        update = next(c for c in trainer.callbacks if isinstance(c, ReferenceModelUpdate))
        self.divergence_seeds.append(update.sample_seeds(trainer, batch, len(batch["caption"])))

    def on_train_end(self, trainer: Trainer, pl_module) -> None:
        update = next(c for c in trainer.callbacks if isinstance(c, ReferenceModelUpdate))
        record = {
            "losses": self.losses,
            "timesteps": self.timesteps,
            "divergence_seeds": self.divergence_seeds,
            "reference": pl_module.reference.model.state_dict(),
            "update": update.state_dict(),
        }
        torch.save(record, Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.pt")


def logged_trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    """A CPU trainer that logs to TensorBoard under ``tmp_path`` and validates on one batch (unless
    ``kwargs`` say otherwise)."""
    return Trainer(
        accelerator="cpu",
        callbacks=callbacks,
        logger=TensorBoardLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"num_sanity_val_steps": 0, "limit_val_batches": 1, **kwargs},
    )


def tiny_datamodule(tiny_data: dict) -> PreferenceDataModule:
    """The 32 px parquet pairs of ``tiny_data``, two pairs a batch."""
    return PreferenceDataModule(
        dataset_name="parquet",
        data_files=tiny_data,
        resolution=32,
        num_workers=0,
        train_batch_size=2,
        val_batch_size=2,
    )


@dataclass
class CachedPairs:
    """The same pairs as a latent-cache batch and as a pixel batch (see :func:`cache_pairs`)."""

    cached: dict
    uncached: dict
    rows: list[dict]
    empty_prompt: dict[str, torch.Tensor]
    num_loaded: int
    num_cached: int


def cache_pairs(module: DiffusionDPOModule, tiny_data: dict, folder: Path, num_pairs: int = 3) -> CachedPairs:
    """Every training pair of ``tiny_data`` written to a latent cache in ``folder`` by ``module``'s
    backbone and read back; the first ``num_pairs`` as a cached batch beside the same pairs as pixels."""
    data = PreferenceDataModule(dataset_name="parquet", data_files=tiny_data, resolution=32, num_workers=0)
    pairs = data.load_pairs("train", None, PairTransform(32, random_crop=False, random_flip=False))
    cache = write_latent_cache(module.backbone, {"train": pairs}, folder, batch_size=5)
    empty = load_empty_prompt(cache)
    cached_data = PreferenceDataModule(latent_cache=str(cache), num_workers=0, validation_split=None)
    cached_data.setup("fit")
    rows = [cached_data.splits["train"].split[i] for i in range(num_pairs)]  # the rows, without draws
    uncached = PreferenceCollator()([pairs[i] for i in range(num_pairs)])
    cached = CachedPreferenceCollator(empty)(rows)
    return CachedPairs(cached, uncached, rows, empty, len(pairs), len(cached_data.splits["train"]))


def assert_same_step(module: DiffusionDPOModule, a: dict, b: dict, timesteps: torch.Tensor) -> None:
    """The preference step of batches ``a`` and ``b`` gives the same loss and errors (same noise and
    latent draws: ``z = mean + std * eps`` takes the global RNG)."""
    outputs = []
    for batch in (a, b):
        torch.manual_seed(0)
        outputs.append(module.preference_step(batch, timesteps, generator=torch.Generator().manual_seed(0)))
    for key in ("loss", "mse_w", "mse_l", "ref_mse_w", "ref_mse_l"):
        torch.testing.assert_close(getattr(outputs[0], key), getattr(outputs[1], key), rtol=1e-4, atol=1e-6)


def validate_with_evaluation(module: DiffusionDPOModule, tiny_data: dict, root: Path):
    """``trainer.validate`` of ``module`` with a ``PreferenceEvaluation`` of one prompt, two seeds and
    two sampler steps at 32 px; returns the trainer and the callback."""
    from lightning_refdpo.callbacks import PreferenceEvaluation

    callback = PreferenceEvaluation(
        prompts=["a red cat"], scorers=[Brightness()], seeds=[0, 1], num_inference_steps=2, resolution=32
    )
    trainer = Trainer(
        accelerator="cpu",
        callbacks=[callback],
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
    )
    trainer.validate(module, tiny_datamodule(tiny_data))
    return trainer, callback


def build_recipe(configs: list, model: str, tiny_data: dict, root: Path, *extra: str):
    """The CLI of ``fit`` with the recipe ``configs`` on the tiny ``model`` and data, on one CPU
    (built, not run)."""
    from lightning_refdpo.cli import build_cli

    return build_cli(
        run=False,
        args=[
            *(f"--config={config}" for config in configs),
            f"--model.init_args.pretrained_model_name_or_path={model}",
            f"--data.init_args.data_files={json.dumps(tiny_data)}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.num_nodes=1",
            "--trainer.strategy=auto",
            f"--trainer.default_root_dir={root}",
            *extra,
        ],
    )
