"""Lightning's DDP (2 CPU processes, gloo) and SLURM environment on the tiny config."""

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_refdpo import DiffusionDPOModule, PreferenceDataModule
from lightning_refdpo.cli import RefDPOCLI, run_cli
from tests.test_cli import tiny_args

REPO = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world_size: int, root: Path) -> None:
    """Run ``lightning-refdpo`` as ``world_size`` local processes, as ``torchrun`` would start them
    (``LOCAL_RANK`` set: Lightning's ``LightningEnvironment`` joins them instead of spawning)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0"}
    env |= {"WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "lightning_refdpo.cli", *args]
    # Each rank writes to its own file: a pipe read one rank after the other would let a rank that
    # fills its pipe block while the other waits for it in a collective.
    root.mkdir(parents=True, exist_ok=True)
    logs = [root / f"rank{r}.log" for r in range(world_size)]
    files = [log.open("wb") for log in logs]
    processes = [
        subprocess.Popen(
            command, cwd=REPO, env={**env, "LOCAL_RANK": str(r)}, stdout=file, stderr=subprocess.STDOUT
        )
        for r, file in enumerate(files)
    ]
    try:
        for p in processes:
            p.wait(timeout=300)
    finally:
        for p, file in zip(processes, files, strict=True):
            p.kill()
            file.close()
    for rank, (p, log) in enumerate(zip(processes, logs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log.read_text()[-3000:]}"


def test_ddp_two_processes_agree_and_match_one_process(tiny_model, tiny_data, tmp_path):
    common = [
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger=false",
        "--trainer.callbacks.init_args.divergence_samples=4",
        "--trainer.callbacks+=tests.helpers.RecordRank",
    ]
    one = tmp_path / "one"
    # One thread, as launch() gives each rank: D is a small difference of two errors, and another
    # thread count's rounding alone can move it by 1e-3 relative.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cli(
            ["fit", *tiny_args(tiny_model, tiny_data, one, *common, "--data.init_args.train_batch_size=4")]
        )
    finally:
        torch.set_num_threads(threads)
    ddp = tmp_path / "ddp"
    ddp_options = ["--trainer.devices=2", "--trainer.strategy=ddp", "--data.init_args.train_batch_size=2"]
    launch(["fit", *tiny_args(tiny_model, tiny_data, ddp, *common, *ddp_options)], 2, ddp)

    single = torch.load(one / "rank0.pt", weights_only=True)
    rank0, rank1 = (torch.load(ddp / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["update"] == rank1["update"] and rank0["update"]["last_event_step"] == 2
    assert all(torch.equal(v, rank1["reference"][k]) for k, v in rank0["reference"].items())
    assert rank0["timesteps"] != rank1["timesteps"]
    # The global batch of 4 is split 2 + 2 over the ranks with the same per-pair draws.
    assert sorted(rank0["timesteps"][0] + rank1["timesteps"][0]) == sorted(single["timesteps"][0])
    global_losses = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"], strict=True)]
    # After one update the losses differ by the rounding of the all-reduced gradient, times beta.
    torch.testing.assert_close(
        torch.tensor(global_losses), torch.tensor(single["losses"]), rtol=1e-3, atol=1e-5
    )
    assert rank0["update"]["frozen"] == single["update"]["frozen"]
    # The divergence estimate: each winner its own t and noise, different on each rank, and D the
    # mean over the union of the ranks' winners, as one process computes it on the whole batch.
    assert set(rank0["divergence_seeds"][-1]).isdisjoint(rank1["divergence_seeds"][-1])
    union = rank0["divergence_seeds"][-1] + rank1["divergence_seeds"][-1]
    assert sorted(union) == sorted(single["divergence_seeds"][-1])
    assert rank0["update"]["last_divergence"] == pytest.approx(single["update"]["last_divergence"], rel=1e-3)


def test_trainer_picks_up_a_simulated_slurm_job(tiny_model, tiny_data, tmp_path, monkeypatch):
    # Task 3 of a 2-node x 2-GPU job, as `srun` in scripts/slurm/refdpo.sbatch starts it.
    slurm = {
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NAME": "refdpo",
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NODELIST": "node[01-02]",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the Trainer sets it to 3
    nodes = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.num_nodes=2",
        "--trainer.strategy=ddp",
    ]
    cli = RefDPOCLI(
        DiffusionDPOModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=tiny_args(tiny_model, tiny_data, tmp_path, *nodes),
        run=False,
    )
    trainer = cli.trainer
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert environment.requeue_signal == signal.SIGUSR1
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (4, 3, 1, 1)
    assert environment.main_address == "node01"
    script = (REPO / "scripts" / "slurm" / "refdpo.sbatch").read_text()
    assert "#SBATCH --signal=SIGUSR1@" in script and "srun lightning-refdpo fit" in script


def test_requeued_slurm_job_resumes_from_its_hpc_checkpoint(tiny_model, tiny_data, tmp_path, monkeypatch):
    options = ["--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]
    first = run_cli(
        ["fit", *tiny_args(tiny_model, tiny_data, tmp_path / "first", *options, "--trainer.max_steps=2")]
    )
    requeued = tmp_path / "requeued"
    requeued.mkdir()
    shutil.copy(first.trainer.checkpoint_callback.last_model_path, requeued / "hpc_ckpt_1.ckpt")
    slurm = {
        "SLURM_JOB_ID": "1",
        "SLURM_JOB_NAME": "refdpo",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
    }
    slurm |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node01"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    cli = run_cli(["fit", *tiny_args(tiny_model, tiny_data, requeued, *options, "--trainer.max_steps=3")])
    assert SLURMEnvironment.detect() and cli.trainer.global_step == 3
    assert cli.model.guard.pairs_loaded == cli.datamodule.train_batch_size, "one step after the resume"


def test_fsdp_config_shards_each_unet_and_its_blocks(capsys):
    configs = [
        f"--config={REPO / 'configs' / 'sdxl' / name}" for name in ("dpo.yaml", "refdpo.yaml", "fsdp.yaml")
    ]
    with pytest.raises(SystemExit):
        run_cli(["fit", *configs, "--print_config"])
    printed = capsys.readouterr().out
    assert "class_path: lightning.pytorch.strategies.FSDPStrategy" in printed
    for block in ("UNet2DConditionModel", "BasicTransformerBlock", "ResnetBlock2D"):
        assert block in printed
