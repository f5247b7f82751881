"""The installed ``lightning-refdpo`` console script as a user runs it: exit status, output, files."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import crafted_checkpoint

REPO = Path(__file__).parents[1]
SCRIPT = Path(sys.executable).parent / "lightning-refdpo"
CONFIG = str(REPO / "configs" / "tiny.yaml")


def run(
    *args: str, cwd: Path = REPO, timeout: int = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``lightning-refdpo ARGS`` offline, on one thread, with ``env`` added to the environment, as
    from a terminal: Ctrl-C (SIGINT) reaches it even when these tests were started where SIGINT is
    ignored (a background job inherits SIG_IGN, and Python then never raises KeyboardInterrupt)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run(
        [str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def fit_args(model: str, data: dict, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"--config={CONFIG}",
        f"--model.init_args.pretrained_model_name_or_path={model}",
        f"--data.init_args.data_files={json.dumps(data)}",
        f"--trainer.default_root_dir={root}",
        "--trainer.limit_val_batches=0",
        *extra,
    ]


def step(path: Path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


def checkpoints(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): step(p) for p in sorted(root.rglob("*.ckpt"))}


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr and "Namespace(" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def trained(tiny_model, tiny_data, tmp_path_factory) -> Path:
    """A 2-step run, started from the model folder's parent with a relative model path."""
    root = tmp_path_factory.mktemp("run")
    model = Path(tiny_model)
    result = run(*fit_args(model.name, tiny_data, root, "--trainer.max_steps=2"), cwd=model.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "<lightning_refdpo" not in result.stdout + result.stderr, "no object printed"
    assert "Epoch 0" in result.stdout and "/-2" not in result.stdout, "no epoch total of -1"
    return root


def test_help_lists_every_subcommand():
    result = run("--help")
    assert result.returncode == 0
    for name in ("fit", "validate", "cache", "evaluate", "export"):
        assert f"    {name} " in result.stdout
    assert "    test " not in result.stdout and "    predict " not in result.stdout
    cache = run("cache", "--help")
    assert cache.returncode == 0 and "lightning-refdpo [options] cache" in cache.stdout
    assert "--output" in cache.stdout and "--trainer.max_steps" in cache.stdout
    usage = run("export", "--help").stdout.split("\n\n")[0].split()
    assert usage[-1] == "ckpt_path" and "[--unsafe_unpickle" in usage, "the checkpoint is positional"


def test_fit_exits_0_with_last_and_final_checkpoints_and_absolute_model_path(trained, tiny_model):
    saved = checkpoints(trained)
    assert saved == {
        "lightning_logs/version_0/checkpoints/epoch=0-step=2.ckpt": 2,
        "lightning_logs/version_0/checkpoints/last.ckpt": 2,
    }
    last = trained / "lightning_logs/version_0/checkpoints/last.ckpt"
    hparams = torch.load(last, weights_only=False)["hyper_parameters"]
    assert hparams["pretrained_model_name_or_path"] == tiny_model


def test_resume_only_when_asked_into_the_same_logger_version(tiny_model, tiny_data, tmp_path):
    first = run(*fit_args(tiny_model, tiny_data, tmp_path, "--trainer.max_steps=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    shutil.copy(last, tmp_path / "on_exception.ckpt")
    before = (tmp_path / "on_exception.ckpt").read_bytes()

    fresh = run(*fit_args(tiny_model, tiny_data, tmp_path, "--trainer.max_steps=1"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "Restored all states" not in fresh.stderr + fresh.stdout, "a new fit starts from scratch"
    assert step(tmp_path / "lightning_logs/version_1/checkpoints/last.ckpt") == 1
    assert (tmp_path / "on_exception.ckpt").read_bytes() == before

    resumed = run(*fit_args(tiny_model, tiny_data, tmp_path, "--trainer.max_steps=3", f"--ckpt_path={last}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stderr + resumed.stdout
    assert step(last) == 3, "resumed in version_0 (its logger version) and saved the last step"
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGINT", 130)], ids=["sigterm", "ctrl-c"])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit_128_plus_the_signal(
    tiny_model, tiny_data, tmp_path, name, status
):
    send = [
        "--trainer.callbacks+=tests.helpers.SendSignal",
        "--trainer.callbacks.init_args.at_step=2",
        f"--trainer.callbacks.init_args.signal={name}",
        "--trainer.enable_checkpointing=false",
    ]
    result = run(*fit_args(tiny_model, tiny_data, tmp_path, "--trainer.max_steps=4", *send))
    assert result.returncode == status, result.stderr[-3000:]
    assert step(tmp_path / "on_exception.ckpt") == 2


def test_failure_at_start_keeps_the_previous_exception_checkpoint(trained, tiny_model, tiny_data, tmp_path):
    shutil.copy(trained / "lightning_logs/version_0/checkpoints/last.ckpt", tmp_path / "on_exception.ckpt")
    before = (tmp_path / "on_exception.ckpt").read_bytes()
    bad_split = "--data.init_args.train_split=no_such_split"
    result = run(*fit_args(tiny_model, tiny_data, tmp_path, bad_split))
    assert_one_line_error(result, "split 'no_such_split'")
    assert (tmp_path / "on_exception.ckpt").read_bytes() == before


def test_misspelt_options_are_one_line_with_the_nearest_valid_one(tiny_model, tiny_data, tmp_path):
    assert_one_line_error(
        run(*fit_args(tiny_model, tiny_data, tmp_path, "--trainer.max_stepz=3")),
        "--trainer.max_stepz",
        "did you mean --trainer.max_steps?",
    )
    assert_one_line_error(
        run(*fit_args(tiny_model, tiny_data, tmp_path, "--model.init_args.betta=3")),
        "did you mean --model.init_args.beta?",
    )


def test_config_errors_are_one_line_naming_the_key(tiny_model, tiny_data, tmp_path):
    nan = tmp_path / "nan.yaml"
    nan.write_text("model:\n  init_args: {learning_rate: .nan}\n")
    result = run(*fit_args(tiny_model, tiny_data, tmp_path), f"--config={nan}")
    assert_one_line_error(result, "model.learning_rate must be a finite number; got nan")
    assert_one_line_error(run("fit", "--config=no_such.yaml"), "config: File does not exist", "no_such.yaml")


def test_evaluate_refuses_before_any_work(trained, tmp_path):
    ckpt = str(trained / "lightning_logs/version_0/checkpoints/last.ckpt")
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    result = run("evaluate", ckpt, f"--output={blocked / 'eval'}", "--device=cpu")
    assert_one_line_error(result, "--output", "not a writable folder")
    for model in (str(tmp_path / "missing.ckpt"), str(tmp_path)):
        assert_one_line_error(run("evaluate", model, f"--output={tmp_path / 'eval'}"), model)
    alias = run("evaluate", f"--ckpt_path={tmp_path / 'missing.ckpt'}", f"--output={tmp_path / 'eval'}")
    assert_one_line_error(alias, f"model {tmp_path / 'missing.ckpt'}: no such file")
    assert not (tmp_path / "eval" / "results.json").exists()


def test_export_from_elsewhere_with_a_moved_base_model(trained, tiny_model, tmp_path):
    ckpt = str(trained / "lightning_logs/version_0/checkpoints/last.ckpt")
    other = {"model": str(tmp_path / "other.ckpt"), "baseline": "x", "prompt_sets": {}}
    (tmp_path / "results.json").write_text(json.dumps(other))
    result = run("export", ckpt, f"--output={tmp_path / 'e'}", f"--evaluation={tmp_path / 'results.json'}")
    assert_one_line_error(result, "holds the results of", "evaluate this checkpoint first")

    moved = tmp_path / "moved_model"
    shutil.copytree(tiny_model, moved)
    original = Path(tiny_model).rename(Path(tiny_model).with_name("away"))
    try:
        gone = run("export", ckpt, f"--output={tmp_path / 'e'}", cwd=tmp_path)
        assert_one_line_error(gone, "--base_model")
        # --ckpt_path: the spelling before the checkpoint became positional, kept as an alias
        export = run("export", f"--ckpt_path={ckpt}", "--output=e", f"--base_model={moved}", cwd=tmp_path)
    finally:
        original.rename(tiny_model)
    assert export.returncode == 0, export.stderr[-3000:]
    assert export.stdout.strip().splitlines()[-1].startswith("exported the unet policy")
    info = json.loads((tmp_path / "e" / "export.json").read_text())
    assert info["base_model"] == str(moved) and info["checkpoint"] == ckpt
    assert f"base_model: {moved}" in (tmp_path / "e" / "README.md").read_text()


def test_a_crafted_checkpoint_is_refused_and_nothing_runs(trained, tiny_model, tiny_data, tmp_path):
    """A checkpoint of ``fit`` with one pickled object added to its hyperparameters (``os.system`` in
    its ``__reduce__``), in a run folder beside the run's own checkpoints: refused by ``export`` and
    by ``fit --ckpt_path last`` (``evaluate`` and ``validate``: ``tests/test_cli.py``)."""
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(trained / "lightning_logs", run_dir / "lightning_logs")
    last = run_dir / "lightning_logs/version_0/checkpoints/last.ckpt"
    crafted = str(crafted_checkpoint(last, run_dir / "crafted.ckpt", marker))
    files = sorted(run_dir.rglob("*"))
    for args in (
        ["export", crafted, f"--output={tmp_path / 'export'}"],
        [*fit_args(tiny_model, tiny_data, run_dir, "--trainer.max_steps=4"), "--ckpt_path=last"],
    ):
        assert_one_line_error(run(*args), f"{crafted} holds posix.system", "--unsafe_unpickle true")
        assert not marker.exists(), f"{args[0]} ran the checkpoint's code"
    assert sorted(run_dir.rglob("*")) == files and not (tmp_path / "export" / "export.json").exists()


def test_a_checkpoint_of_a_module_class_not_installed_here_names_it_and_the_fix(trained, tmp_path):
    """A checkpoint of ``--model.class_path my_project.MyModule`` (the class named where ``fit``
    writes it: ``module_class`` and LightningCLI's ``_class_path``) exported where ``my_project`` is
    not importable (``evaluate``, ``fit --ckpt_path`` and the fix: ``tests/test_cli.py``)."""
    checkpoint = torch.load(trained / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    checkpoint["module_class"] = checkpoint["hyper_parameters"]["_class_path"] = "my_project.MyModule"
    torch.save(checkpoint, tmp_path / "mine.ckpt")
    result = run("export", str(tmp_path / "mine.ckpt"), f"--output={tmp_path / 'export'}")
    assert_one_line_error(result, "my_project.MyModule", "install the package", "PYTHONPATH")
