"""The documented optimizers (``lightning_refdpo.optim``): each takes steps on the tiny model through
``lightning-refdpo fit`` and resumes exactly; ``scale_lr`` scales every one; a bad optimizer argument
stops the CLI at start-up with one line naming the key."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_refdpo import DiffusionDPOModule, StableDiffusionXLDPOModule
from lightning_refdpo.cli import main, run_cli
from tests.test_cli import CONFIG, tiny_args

ADAFACTOR = {
    "class_path": "transformers.Adafactor",
    "init_args": {
        "weight_decay": 1e-2,
        "clip_threshold": 1.0,
        "scale_parameter": False,
        "relative_step": False,
    },
}


def bitsandbytes_8bit_skip() -> str | None:
    """Why the AdamW8bit test cannot run here, or None: bitsandbytes is an optional extra, and its
    8-bit optimizer kernels exist for CUDA and, from its multi-backend releases on, for the CPU."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (the optional extra: pip install 'lightning-refdpo[bnb]')"
    import bitsandbytes

    param = torch.nn.Parameter(torch.zeros(4096))
    param.grad = torch.ones_like(param)
    try:
        bitsandbytes.optim.AdamW8bit([param]).step()
    except Exception as err:  # the backend's own error says what is missing
        return f"bitsandbytes {bitsandbytes.__version__} has no 8-bit AdamW kernel for the CPU: {err}"
    return None


OPTIMIZERS = {
    "adamw-default": None,
    "adamw-foreach": {"class_path": "torch.optim.AdamW", "init_args": {"foreach": True}},
    "adamw-fused": {"class_path": "torch.optim.AdamW", "init_args": {"fused": True}},
    "adafactor-diffusion-dpo": ADAFACTOR,
    "adamw8bit": pytest.param(
        {"class_path": "bitsandbytes.optim.AdamW8bit", "init_args": {"weight_decay": 1e-2}},
        marks=pytest.mark.skipif(bitsandbytes_8bit_skip() is not None, reason=str(bitsandbytes_8bit_skip())),
    ),
}
EXPECTED_CLASS = {
    "adamw-default": "AdamW",
    "adamw-foreach": "AdamW",
    "adamw-fused": "AdamW",
    "adafactor-diffusion-dpo": "Adafactor",
    "adamw8bit": "AdamW8bit",
}


def fit(tiny_model, tiny_data, root: Path, optimizer, *extra: str):
    options = [
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.init_args.dirpath={root / 'ckpt'}",
        "--trainer.callbacks.init_args.every_n_train_steps=1",
        "--trainer.callbacks.init_args.save_top_k=-1",
        "--model.init_args.scale_lr=true",
        "--model.init_args.lr_scheduler=constant",
    ]
    if optimizer is not None:
        options.append(f"--model.init_args.optimizer={json.dumps(optimizer)}")
    return run_cli(["fit", *tiny_args(tiny_model, tiny_data, root, *options, *extra)])


@pytest.mark.parametrize("optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_optimizer_takes_steps_and_resumes_exactly(tiny_model, tiny_data, tmp_path, optimizer, request):
    name = request.node.callspec.id
    whole = fit(tiny_model, tiny_data, tmp_path / "whole", optimizer)
    used = whole.trainer.optimizers[0]
    assert type(used).__name__ == EXPECTED_CLASS[name]
    # scale_lr: the tiny config's 1e-5 per pair x 4 pairs a batch, whatever the optimizer.
    assert used.param_groups[0]["lr"] == pytest.approx(1e-5 * 4)
    policy = [p for p in whole.model.policy.parameters() if p.requires_grad]
    assert sum(len(group["params"]) for group in used.param_groups) == len(policy)
    if name == "adafactor-diffusion-dpo":
        group = used.param_groups[0]
        settings = {k: group[k] for k in ADAFACTOR["init_args"]}
        assert settings == ADAFACTOR["init_args"]
        matrix = next(p for p in policy if p.ndim == 2)
        assert {"exp_avg_sq_row", "exp_avg_sq_col"} <= used.state[matrix].keys(), "a factored second moment"
    step_one = next((tmp_path / "whole" / "ckpt").glob("*step=1.ckpt"))
    checkpoint = torch.load(step_one, weights_only=True)  # the hyperparameters are plain data
    assert checkpoint["hyper_parameters"]["optimizer"]["class_path"].endswith(EXPECTED_CLASS[name])

    resumed = fit(tiny_model, tiny_data, tmp_path / "resumed", optimizer, f"--ckpt_path={step_one}")
    assert resumed.trainer.global_step == 2
    expected, got = whole.model.policy.state_dict(), resumed.model.policy.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "policy differs after resume"
    expected_state = used.state_dict()["state"]
    torch.testing.assert_close(
        resumed.trainer.optimizers[0].state_dict()["state"], expected_state, rtol=0, atol=0
    )


def test_checkpoint_rebuilds_the_module_with_its_optimizer(tiny_model, tiny_data, tmp_path):
    fit(tiny_model, tiny_data, tmp_path, ADAFACTOR)
    module = DiffusionDPOModule.load_from_checkpoint(
        next((tmp_path / "ckpt").glob("*step=2.ckpt")), map_location="cpu", weights_only=True
    )
    assert module.hparams.optimizer["class_path"] == "transformers.optimization.Adafactor"
    assert module.hparams.optimizer["init_args"]["relative_step"] is False


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        ({"class_path": "torch.optim.AdamW", "init_args": {"weight_decai": 0.1}}, "init_args.weight_decai"),
        ({"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.1}}, "init_args.lr: given by the library"),
        ({"class_path": "transformers.Adafactor"}, "relative_step"),
        ({"class_path": "transformers.Adafactor", "init_args": {"relative_step": False, "eps": 1e-8}}, "eps"),
        ({"class_path": "torch.optim.AdamWW"}, "cannot import"),
        (lambda params, lr: torch.optim.SGD(params, lr), "class or class_path"),
    ],
    ids=["typo", "lr", "adafactor-relative-step", "adafactor-eps", "class", "lambda"],
)
def test_bad_optimizer_in_python_refused_before_loading(optimizer, match):
    with pytest.raises(ValueError, match=match):
        DiffusionDPOModule("/nonexistent/model", optimizer=optimizer)


def test_scheduler_class_and_bad_schedules(tiny_model):
    module = DiffusionDPOModule(
        tiny_model,
        scale_lr=False,
        lr_scheduler={"class_path": "torch.optim.lr_scheduler.LinearLR", "init_args": {"start_factor": 0.5}},
    )
    assert module.hparams.lr_scheduler["class_path"] == "torch.optim.lr_scheduler.LinearLR"
    for bad, match in (
        ({"lr_scheduler": "cosin"}, "model.lr_scheduler must be one of"),
        ({"lr_scheduler": {"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau"}}, "monitored metric"),
        (
            {"lr_scheduler": {"class_path": "torch.optim.lr_scheduler.LinearLR"}, "lr_warmup_steps": 10},
            "lr_warmup_steps",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            DiffusionDPOModule("/nonexistent/model", **bad)


def test_a_misspelt_optimizer_argument_stops_the_cli_at_start_up(tmp_path):
    options = [
        "--model.init_args.optimizer=torch.optim.AdamW",
        "--model.init_args.optimizer.init_args.weight_decai=0.1",
    ]
    run = subprocess.run(
        [Path(sys.executable).parent / "lightning-refdpo", "fit", "--config", CONFIG, *options],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    expected = "model.optimizer.init_args.weight_decai: not accepted by torch.optim.AdamW (did you mean weight_decay?)"
    assert len(errors) == 1 and expected in errors[0], run.stderr
    assert not (tmp_path / "outputs").exists(), "nothing ran"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            [
                "--model.init_args.optimizer=transformers.Adafactor",
                "--model.init_args.optimizer.init_args.lr=0.1",
            ],
            "model.optimizer.init_args.lr: the learning rate is model.init_args.learning_rate",
        ),
        (
            ["--model.init_args.optimizer.init_args.weight_decay=0.1"],
            "model.optimizer.init_args.weight_decay: give model.optimizer's class_path first",
        ),
        (
            ["--model.init_args.optimizer=transformers.Adafactor"],
            "model.optimizer.init_args.relative_step: true makes Adafactor pick its own learning rate",
        ),
    ],
    ids=["lr", "no-class-path", "adafactor-relative-step"],
)
def test_other_optimizer_mistakes_are_one_line_naming_the_key(options, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        sys.exit(main(["fit", "--config", CONFIG, *options]))
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0]


def test_version_0_1_adam_settings_still_load(tiny_sdxl):
    """A checkpoint or config of version 0.1 names AdamW by its adam_* settings (a subclass passes
    them on through its keyword arguments, as ``load_from_checkpoint`` does with the hyperparameters)."""
    legacy = {"adam_beta1": 0.9, "adam_beta2": 0.99, "adam_weight_decay": 0.05, "adam_epsilon": 1e-6}
    module = StableDiffusionXLDPOModule(tiny_sdxl, **legacy)
    assert module.hparams.optimizer == {
        "class_path": "torch.optim.adamw.AdamW",
        "init_args": {"betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.05},
    }
    with pytest.raises(ValueError, match="adam_weight_decay is version 0.1's AdamW setting"):
        DiffusionDPOModule("/nonexistent/model", adam_weight_decay=0.05, optimizer=ADAFACTOR)
