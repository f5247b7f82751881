import inspect
import json
from pathlib import Path

import pytest
import torch

from lightning_refdpo import DiffusionDPOModule
from lightning_refdpo.cli import ckpt_path_as_positional, main, run_cli
from lightning_refdpo.sources import load_module
from lightning_refdpo.testing import save_tiny_stable_diffusion
from tests.helpers import crafted_checkpoint

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
LEGACY = Path(__file__).parent / "fixtures" / "legacy" / "full.ckpt"


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


def one_line_error(capsys, args: list[str]) -> str:
    """The error line of ``lightning-refdpo ARGS`` run in this process; its exit status must be 2."""
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("lightning-refdpo: error: "), errors
    return errors[0]


@pytest.fixture(scope="module")
def legacy_model(tmp_path_factory) -> str:
    """The tiny model of ``tests/fixtures/legacy`` (its checkpoints name a folder that is gone)."""
    folder = tmp_path_factory.mktemp("legacy") / "model"
    return str(save_tiny_stable_diffusion(folder, block_out_channels=(8, 16), cross_attention_dim=16))


def test_a_crafted_checkpoint_is_refused_by_evaluate_and_validate_unless_trusted(
    tiny_model, tiny_data, legacy_model, tmp_path, capsys
):
    """A checkpoint (of version 0.1) with an object in its hyperparameters whose unpickling runs
    ``touch`` (``export`` and ``fit --ckpt_path last``: ``tests/test_console.py``)."""
    marker = tmp_path / "ran"
    crafted = str(crafted_checkpoint(LEGACY, tmp_path / "crafted.ckpt", marker))
    for args in (
        ["evaluate", crafted, f"--output={tmp_path / 'eval'}", "--device=cpu"],
        ["evaluate", str(LEGACY), f"--baseline={crafted}", f"--output={tmp_path / 'eval'}"],
        ["validate", *tiny_args(tiny_model, tiny_data, tmp_path), f"--ckpt_path={crafted}"],
    ):
        error = one_line_error(capsys, args)
        assert f"{crafted} holds posix.system" in error and "--unsafe_unpickle true" in error
        assert not marker.exists(), f"{args[0]} ran the checkpoint's code"
    export = ["export", crafted, f"--output={tmp_path / 'export'}", f"--base_model={legacy_model}"]
    run_cli([*export, "--unsafe_unpickle=true"])
    assert marker.exists(), "--unsafe_unpickle unpickles the whole file: what it holds runs"
    assert (tmp_path / "export" / "unet" / "config.json").is_file(), "and the 0.1 checkpoint exports"


def test_a_checkpoint_of_a_module_class_not_importable_names_it_and_the_fix(
    tiny_model, tiny_data, legacy_model, tmp_path, capsys, monkeypatch
):
    checkpoint = torch.load(LEGACY, weights_only=True)
    checkpoint["module_class"] = checkpoint["hyper_parameters"]["_class_path"] = "my_project.MyModule"
    ckpt = str(tmp_path / "mine.ckpt")
    torch.save(checkpoint, ckpt)
    for args in (
        ["evaluate", ckpt, f"--output={tmp_path / 'eval'}", "--device=cpu"],
        ["fit", *tiny_args(tiny_model, tiny_data, tmp_path), f"--ckpt_path={ckpt}"],
    ):
        error = one_line_error(capsys, args)
        assert "my_project.MyModule" in error and "install the package" in error and "PYTHONPATH" in error

    (tmp_path / "project" / "my_project").mkdir(parents=True)
    (tmp_path / "project" / "my_project" / "__init__.py").write_text(
        "from lightning_refdpo import DiffusionDPOModule\n\n\nclass MyModule(DiffusionDPOModule):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "project"))
    run_cli(["export", ckpt, f"--output={tmp_path / 'export'}", f"--base_model={legacy_model}"])
    assert (tmp_path / "export" / "export.json").is_file(), "with its package importable it exports"
    module = load_module(ckpt, pretrained_model_name_or_path=legacy_model)
    assert f"{type(module).__module__}.{type(module).__name__}" == "my_project.MyModule"


def test_export_and_evaluate_take_ckpt_path_as_their_positional_argument():
    assert ckpt_path_as_positional(["export", "--output=e", "--ckpt_path", "a.ckpt"]) == [
        "export",
        "a.ckpt",
        "--output=e",
    ]
    assert ckpt_path_as_positional(["evaluate", "--ckpt_path=a.ckpt", "--seeds=[0]"]) == [
        "evaluate",
        "a.ckpt",
        "--seeds=[0]",
    ]
    assert ckpt_path_as_positional(["fit", "--ckpt_path=last"]) == ["fit", "--ckpt_path=last"]
