"""Checkpoints are opened weights-only: a crafted one is refused and nothing in it runs. Checkpoints
written before the backbone / reference-strategy layout (version 0.1: ``unet.*``,
``reference_unet.*``) load, weights-only, and resume under today's names (``policy.*``,
``reference.model.*``)."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_refdpo import PreferenceDataModule, ReferenceModelUpdate
from lightning_refdpo.callbacks.checkpointing import latest_checkpoint
from lightning_refdpo.checkpoint import CheckpointError, current_key, load_checkpoint
from lightning_refdpo.sources import load_module
from lightning_refdpo.testing import save_random_preference_set, save_tiny_stable_diffusion
from tests.helpers import crafted_checkpoint, make_module

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def test_legacy_keys_are_renamed_once():
    assert current_key("unet.conv_in.weight") == "policy.conv_in.weight"
    assert current_key("reference_unet.conv_in.weight") == "reference.model.conv_in.weight"
    assert current_key("policy.conv_in.weight") == "policy.conv_in.weight"


def test_a_checkpoint_holding_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    crafted = crafted_checkpoint(LEGACY / "full.ckpt", tmp_path / "run" / "crafted.ckpt", marker)
    with pytest.raises(CheckpointError, match=r"crafted.ckpt holds posix.system.*--unsafe_unpickle true"):
        load_checkpoint(crafted)
    with pytest.raises(CheckpointError, match="crafted.ckpt holds posix.system"):
        latest_checkpoint(tmp_path)  # what --ckpt_path last resumes: it stops at the file
    assert not marker.exists()
    assert load_checkpoint(crafted, unsafe_unpickle=True)["hyper_parameters"]["note"] == 0
    assert marker.exists(), "the opt-in unpickles the whole file, running what it holds"


@pytest.mark.parametrize("name, lora_rank", [("full", None), ("lora", 2)])
def test_a_checkpoint_of_version_0_1_resumes(name, lora_rank, tmp_path):
    # The model and data of tests/fixtures/legacy/make_legacy_checkpoints.py, rebuilt from the same seeds.
    model = save_tiny_stable_diffusion(tmp_path / "model", block_out_channels=(8, 16), cross_attention_dim=16)
    data = save_random_preference_set(tmp_path / "train.parquet", num_pairs=8, seed=0)
    legacy = load_checkpoint(LEGACY / f"{name}.ckpt")
    assert any(k.startswith("unet.") for k in legacy["state_dict"]), "the fixture is in the old layout"
    exported = load_module(LEGACY / f"{name}.ckpt", pretrained_model_name_or_path=str(model)).state_dict()
    for key, value in legacy["state_dict"].items():
        torch.testing.assert_close(exported[current_key(key)], value, rtol=0, atol=0)

    module = make_module(str(model), lora_rank=lora_rank)
    callback = ReferenceModelUpdate(every_n_steps=1)
    resumed = {}

    class RecordResumedState(Callback):
        def on_train_start(self, trainer, pl_module):
            resumed.update(
                step=trainer.global_step,
                updates=callback.num_updates,
                state={k: v.clone() for k, v in pl_module.state_dict().items()},
            )

    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[callback, RecordResumedState()],
    )
    datamodule = PreferenceDataModule(
        dataset_name="parquet",
        data_files={"train": str(data)},
        validation_split=None,
        resolution=32,
        num_workers=0,
        train_batch_size=2,
    )
    trainer.fit(module, datamodule, ckpt_path=str(LEGACY / f"{name}.ckpt"), weights_only=True)

    assert (
        resumed["step"] == 2
        and resumed["updates"] == legacy["callbacks"]["ReferenceModelUpdate"]["num_updates"]
    )
    for key, value in legacy["state_dict"].items():
        torch.testing.assert_close(resumed["state"][current_key(key)], value, rtol=0, atol=0)
    assert trainer.global_step == 3 and callback.num_updates == resumed["updates"] + 1
