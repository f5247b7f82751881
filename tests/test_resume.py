"""Exact resume (8 steps = 4 + interrupt + resume 4, bitwise on CPU) and clean interrupts."""

import csv
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_refdpo.cli import run_cli
from tests.test_cli import tiny_args


def fit(tiny_model, tiny_data, root: Path, *extra: str):
    options = [
        "--trainer.max_steps=8",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.logger.init_args.name=run",
    ]
    return run_cli(["fit", *tiny_args(tiny_model, tiny_data, root, *options, *extra)])


def interrupted_fit(tiny_model, tiny_data, root: Path, interrupt: str) -> dict:
    """A run that receives ``interrupt`` after 4 steps; returns its ``on_exception.ckpt``."""
    send = [
        "--trainer.callbacks+=tests.helpers.SendSignal",
        "--trainer.callbacks.init_args.at_step=4",
        f"--trainer.callbacks.init_args.signal={interrupt}",
    ]
    stopped = {"SIGTERM": SIGTERMException, "SIGINT": KeyboardInterrupt}[interrupt]
    try:
        with pytest.raises(stopped):
            fit(tiny_model, tiny_data, root, *send)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C on shutdown
    return torch.load(root / "on_exception.ckpt", weights_only=True)


def step_losses(root: Path) -> dict[int, str]:
    losses = {}
    for path in root.glob("run/version_*/metrics.csv"):
        with path.open() as f:
            losses |= {
                int(r["step"]): r["train/loss_step"] for r in csv.DictReader(f) if r["train/loss_step"]
            }
    return losses


def weights(module) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": v
        for n, m in (("policy", module.policy), ("reference", module.reference.model))
        for k, v in m.state_dict().items()
    }


def reference_callback(cli):
    return next(c for c in cli.trainer.callbacks if type(c).__name__ == "ReferenceModelUpdate")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    return fit(tiny_model, tiny_data, root), root


def test_sigterm_then_resume_equals_uninterrupted_run(tiny_model, tiny_data, tmp_path, uninterrupted):
    whole, whole_root = uninterrupted
    state = interrupted_fit(tiny_model, tiny_data, tmp_path, "SIGTERM")
    assert state["global_step"] == 4
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches_consumed": 4}
    ]
    assert state["optimizer_states"] and state["lr_schedulers"]
    assert set(state["rng_states"]) == {"torch", "torch.cuda"}
    callback = next(v for k, v in state["callbacks"].items() if "ReferenceModelUpdate" in k)
    assert {"num_updates", "frozen", "last_divergence"} <= callback.keys()
    assert any(k.startswith("reference.model.") for k in state["state_dict"])

    resumed = fit(tiny_model, tiny_data, tmp_path, f"--ckpt_path={tmp_path / 'on_exception.ckpt'}")
    assert resumed.trainer.global_step == 8
    expected_state, got_state = (
        reference_callback(whole).state_dict(),
        reference_callback(resumed).state_dict(),
    )
    assert got_state == expected_state
    expected, got = weights(whole.model), weights(resumed.model)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "weights differ after resume"
    assert step_losses(whole_root) == step_losses(tmp_path)
    assert len(step_losses(tmp_path)) == 8


def test_ctrl_c_saves_the_state_after_the_last_step(tiny_model, tiny_data, tmp_path):
    state = interrupted_fit(tiny_model, tiny_data, tmp_path, "SIGINT")
    assert state["global_step"] == 4
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches_consumed": 4}
    ]
