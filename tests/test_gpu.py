"""Training on a CUDA GPU, every family, full fine-tuning and LoRA, fp32 and bf16-mixed with bf16
frozen copies: what CPU tests cannot see (tensors on the wrong device, dtype mixes under autocast).
Skipped without a GPU (CI has none); run them where one is: ``pytest tests/test_gpu.py``."""

import pytest
import torch

from lightning_refdpo import (
    DiffusionDPOModule,
    ReferenceModelUpdate,
    StableDiffusion3DPOModule,
    StableDiffusionXLDPOModule,
)
from lightning_refdpo.evaluation import GenerationConfig, generate
from tests.helpers import fit_tiny, make_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAMILIES = {"sd15": DiffusionDPOModule, "sdxl": StableDiffusionXLDPOModule, "sd3": StableDiffusion3DPOModule}
SETTINGS = {
    "full-bf16": {"precision": "bf16-mixed", "frozen_dtype": "bfloat16", "lora_rank": None},
    "lora-bf16": {"precision": "bf16-mixed", "frozen_dtype": None, "lora_rank": 4},
    "full-fp32": {"precision": "32-true", "frozen_dtype": None, "lora_rank": None},
}


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTINGS.keys())
@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_reference_updates_and_generation_on_the_gpu(
    family, setting, tiny_model, tiny_sdxl, tiny_sd3, tiny_data
):
    path = {"sd15": tiny_model, "sdxl": tiny_sdxl, "sd3": tiny_sd3}[family]
    options = SETTINGS[setting]
    module = make_module(
        path,
        FAMILIES[family],
        lora_rank=options["lora_rank"],
        frozen_dtype=options["frozen_dtype"],
        reward_scale=True,
    )
    callback = ReferenceModelUpdate(every_n_steps=1)
    trainer = fit_tiny(
        module,
        tiny_data,
        max_steps=3,
        accelerator="gpu",
        devices=1,
        precision=options["precision"],
        callbacks=[callback],
    )
    assert trainer.global_step == 3 and callback.num_updates == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and torch.isfinite(
        torch.tensor(callback.last_divergence)
    )
    module = module.cuda().eval()
    config = GenerationConfig(
        num_inference_steps=2, guidance_scale=4.0, resolution=32, scheduler=None, batch_size=2
    )
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=options["precision"] == "bf16-mixed"):
        images = generate(module.build_pipeline(), [("a red square", 0), ("a blue circle", 1)], config)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


OBJECTIVES = {
    "kto": {"loss_type": "kto", "beta": 1000.0},
    "dspo-sd15": {"loss_type": "dspo", "beta": 0.001},
    "dspo-sdxl-safeguard": {"loss_type": "dspo", "dspo_form": "sdxl", "winner_preserving_mu": 0.6},
    "dmpo": {"loss_type": "dmpo", "beta": 2000.0},
    "dpo-safeguard": {"loss_type": "sigmoid", "winner_preserving_mu": 0.9},
}


@pytest.mark.parametrize("setting", ["full-bf16", "lora-bf16"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains_bf16_on_the_gpu(objective, setting, tiny_sdxl, tiny_data):
    """The objectives beside Diffusion-DPO under autocast (bf16 predictions, float32 residuals and
    errors) with bf16 frozen copies, on SDXL."""
    options = SETTINGS[setting]
    module = make_module(
        tiny_sdxl,
        StableDiffusionXLDPOModule,
        lora_rank=options["lora_rank"],
        frozen_dtype=options["frozen_dtype"],
        reward_scale=True,
        **OBJECTIVES[objective],
    )
    callback = ReferenceModelUpdate(every_n_steps=1)
    trainer = fit_tiny(
        module,
        tiny_data,
        max_steps=2,
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        callbacks=[callback],
    )
    assert trainer.global_step == 2 and callback.num_updates == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
