"""Write the checkpoints of tests/data/legacy with the code of commit 28abcd8 (before the backbone /
reference-strategy redesign): a tiny SD1.5 model, 2 training steps, full fine-tuning and LoRA.

    git worktree add /tmp/legacy 28abcd8 && cd /tmp/legacy && \
        HF_HUB_OFFLINE=1 python tests/data/legacy/make_legacy_checkpoints.py OUTPUT
"""

import sys
from pathlib import Path

from lightning.pytorch import Trainer, seed_everything

from lightning_refdpo import DiffusionDPOModule, PreferenceDataModule, ReferenceModelUpdate
from lightning_refdpo.testing import save_random_preference_set, save_tiny_stable_diffusion

output = Path(sys.argv[1])
model = save_tiny_stable_diffusion(output / "model", block_out_channels=(8, 16), cross_attention_dim=16)
data = save_random_preference_set(output / "train.parquet", num_pairs=8, seed=0)
for name, lora_rank in (("full", None), ("lora", 2)):
    seed_everything(0)
    module = DiffusionDPOModule(str(model), lora_rank=lora_rank, learning_rate=1e-3, scale_lr=False)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[ReferenceModelUpdate(every_n_steps=1)],
    )
    datamodule = PreferenceDataModule(
        dataset_name="parquet",
        data_files={"train": str(data)},
        validation_split=None,
        resolution=32,
        num_workers=0,
        train_batch_size=2,
    )
    trainer.fit(module, datamodule)
    trainer.save_checkpoint(output / f"{name}.ckpt")
