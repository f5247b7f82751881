import inspect
import json
from pathlib import Path

import pytest
import torch

from lightning_refdpo import DiffusionDPOModule
from lightning_refdpo.cli import run_cli

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


def tiny_args(tiny_model, tiny_data, root, *extra):
    return [
        "--config",
        CONFIG,
        f"--model.init_args.pretrained_model_name_or_path={tiny_model}",
        f"--data.init_args.data_files={json.dumps(tiny_data)}",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def test_fit_tiny_config_end_to_end_and_resume(tiny_model, tiny_data, tmp_path):
    cli = run_cli(["fit", *tiny_args(tiny_model, tiny_data, tmp_path, "--trainer.max_steps=4")])
    trainer = cli.trainer
    assert trainer.global_step == 4
    metrics = trainer.callback_metrics
    for key in (
        "train/loss",
        "train/implicit_acc",
        "train/reward_margin",
        "train/mse_w",
        "train/ref_mse_l",
        "val/implicit_acc",
        "val/implicit_acc_initial",
        "val/initial_margin",
    ):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert "ref/divergence" in metrics and "ref/frozen" in metrics

    ckpt_path = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    checkpoint = torch.load(ckpt_path, weights_only=False)
    keys = checkpoint["state_dict"].keys()
    assert any(k.startswith("reference.model.") for k in keys)
    assert not any(k.startswith(("backbone.", "reference.initial_model.")) for k in keys)
    callback_state = next(v for k, v in checkpoint["callbacks"].items() if "ReferenceModelUpdate" in k)
    assert callback_state["last_event_step"] == 4

    resumed = run_cli(
        [
            "fit",
            *tiny_args(
                tiny_model,
                tiny_data,
                tmp_path / "resumed",
                "--trainer.max_steps=6",
                f"--ckpt_path={ckpt_path}",
            ),
        ]
    )
    assert resumed.trainer.global_step == 6
    update = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "ReferenceModelUpdate")
    assert update.last_event_step == 6 and update.num_updates + int(update.frozen) >= 1


def test_fit_lora(tiny_model, tiny_data, tmp_path):
    cli = run_cli(
        [
            "fit",
            *tiny_args(
                tiny_model, tiny_data, tmp_path, "--trainer.max_steps=4", "--model.init_args.lora_rank=2"
            ),
        ]
    )
    assert cli.trainer.global_step == 4
    checkpoint = torch.load(
        cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path,
        weights_only=False,
    )
    assert all("lora_" in k for k in checkpoint["state_dict"])


def test_validate(tiny_model, tiny_data, tmp_path):
    cli = run_cli(["validate", *tiny_args(tiny_model, tiny_data, tmp_path)])
    assert "val/implicit_acc" in cli.trainer.callback_metrics


def test_bad_config_refused_at_start(tiny_model, tiny_data, tmp_path):
    with pytest.raises(ValueError, match="every_n_steps"):
        run_cli(
            [
                "fit",
                *tiny_args(tiny_model, tiny_data, tmp_path),
                "--trainer.callbacks.init_args.every_n_steps=-1",
            ]
        )


def test_the_maintained_sd15_id_everywhere():
    repo = Path(__file__).parents[1]
    files = [*repo.glob("configs/**/*.yaml"), repo / "README.md", *repo.glob("lightning_refdpo/**/*.py")]
    assert [f.name for f in files if "runwayml/" in f.read_text()] == []
    default = inspect.signature(DiffusionDPOModule).parameters["pretrained_model_name_or_path"].default
    assert default == "stable-diffusion-v1-5/stable-diffusion-v1-5"
