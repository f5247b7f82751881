"""Training on a CUDA GPU, every family, full fine-tuning and LoRA, fp32 and bf16-mixed with bf16
frozen copies: what CPU tests cannot see (tensors on the wrong device, dtype mixes under autocast).
Skipped without a GPU (CI has none); run them where one is: ``pytest tests/test_gpu.py``."""

import gc

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


def train_on_the_gpu(path, module_class, setting, tiny_data, steps, **module_options):
    """``steps`` training steps of a tiny module in ``setting``, a reference update after each;
    checks that they all ran and that the loss is finite."""
    options = SETTINGS[setting]
    module = make_module(
        path,
        module_class,
        lora_rank=options["lora_rank"],
        frozen_dtype=options["frozen_dtype"],
        reward_scale=True,
        **module_options,
    )
    callback = ReferenceModelUpdate(every_n_steps=1)
    trainer = fit_tiny(
        module,
        tiny_data,
        max_steps=steps,
        accelerator="gpu",
        devices=1,
        precision=options["precision"],
        callbacks=[callback],
    )
    assert trainer.global_step == steps and callback.num_updates == steps
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    return module, callback


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTINGS.keys())
@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_reference_updates_and_generation_on_the_gpu(
    family, setting, tiny_model, tiny_sdxl, tiny_sd3, tiny_data
):
    path = {"sd15": tiny_model, "sdxl": tiny_sdxl, "sd3": tiny_sd3}[family]
    module, callback = train_on_the_gpu(path, FAMILIES[family], setting, tiny_data, steps=3)
    assert torch.isfinite(torch.tensor(callback.last_divergence))
    module = module.cuda().eval()
    config = GenerationConfig(
        num_inference_steps=2, guidance_scale=4.0, resolution=32, scheduler=None, batch_size=2
    )
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=SETTINGS[setting]["precision"] == "bf16-mixed"):
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
    train_on_the_gpu(
        tiny_sdxl, StableDiffusionXLDPOModule, setting, tiny_data, steps=2, **OBJECTIVES[objective]
    )


def fsdp():
    """``configs/sdxl/fsdp.yaml``'s strategy: each UNet and its transformer and resnet blocks are units."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(
        sharding_strategy="FULL_SHARD",
        auto_wrap_policy={UNet2DConditionModel, BasicTransformerBlock, ResnetBlock2D},
        state_dict_type="full",
    )


def fit_with_events(
    tiny_model, tiny_data, root, strategy, accepted: bool, frozen_dtype, max_steps=4, ckpt=None
):
    """4 bf16-mixed steps with a reference-update event every 2 steps, accepted or refused (the real
    divergence forwards run either way), and a full checkpoint every 2 steps; returns the peak memory."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = make_module(tiny_model, frozen_dtype=frozen_dtype, reward_scale=True, learning_rate=1e-4)
    if not accepted:
        measured = module.estimate_divergence
        module.estimate_divergence = lambda *args, **kwargs: measured(*args, **kwargs) + 1.0  # above the cap
    callback = ReferenceModelUpdate(every_n_steps=2, max_divergence=0.5)
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fit_tiny(
        module,
        tiny_data,
        max_steps=max_steps,
        accelerator="gpu",
        devices=1,
        strategy=strategy,
        precision="bf16-mixed",
        enable_checkpointing=True,
        callbacks=[callback, checkpoints],
        ckpt_path=ckpt,
    )
    return callback, torch.cuda.max_memory_allocated()


@pytest.mark.parametrize("frozen_dtype", [None, "bfloat16"], ids=["fp32-copies", "bf16-copies"])
@pytest.mark.parametrize("accepted", [True, False], ids=["accepted", "refused"])
def test_fsdp_update_events_full_checkpoint_and_exact_resume(
    tiny_model, tiny_data, tmp_path, accepted, frozen_dtype
):
    """FSDP at world size 1 still wraps the three UNets into units and runs the update events through
    them: 4 steps in one run and 2 + resume + 2 from the ``state_dict_type: full`` checkpoint give the
    same policy, reference and decisions; the peak memory is reported against DDP on the same model."""
    whole, fsdp_peak = fit_with_events(
        tiny_model, tiny_data, tmp_path / "whole", fsdp(), accepted, frozen_dtype
    )
    assert (whole.num_updates, whole.frozen) == ((2, False) if accepted else (0, True))
    step_two = next((tmp_path / "whole").glob("*step=2.ckpt"))
    state = torch.load(step_two, map_location="cpu", weights_only=True)
    assert any(k.startswith("policy.") for k in state["state_dict"])
    assert any(k.startswith("reference.model.") for k in state["state_dict"])
    resumed, _ = fit_with_events(
        tiny_model, tiny_data, tmp_path / "resumed", fsdp(), accepted, frozen_dtype, ckpt=str(step_two)
    )
    for key in ("num_updates", "num_reinits", "frozen", "last_event_step"):
        assert resumed.state_dict()[key] == whole.state_dict()[key], key
    assert resumed.last_divergence == pytest.approx(whole.last_divergence, rel=1e-3, abs=1e-6)
    expected = torch.load(next((tmp_path / "whole").glob("*step=4.ckpt")), weights_only=True)["state_dict"]
    got = torch.load(next((tmp_path / "resumed").glob("*step=4.ckpt")), weights_only=True)["state_dict"]
    assert expected.keys() == got.keys()
    for key in expected:  # GPU kernels may reduce in another order between runs: a tolerance
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)

    _, ddp_peak = fit_with_events(tiny_model, tiny_data, tmp_path / "ddp", "ddp", accepted, frozen_dtype)
    print(
        f"peak memory of 4 steps with events: FSDP {fsdp_peak / 2**20:.1f} MiB, DDP {ddp_peak / 2**20:.1f} MiB"
    )
    # World size 1 shards nothing (FSDP falls back to NO_SHARD): FSDP must not hold more than DDP plus
    # its flat-parameter bookkeeping.
    assert 0 < fsdp_peak <= 1.5 * ddp_peak


def test_offload_initial_keeps_the_initial_model_off_the_gpu(tiny_model, tiny_data):
    allocated = {}
    for offload in (False, True):
        module = make_module(tiny_model, frozen_dtype="bfloat16", offload_initial=offload)
        callback = ReferenceModelUpdate(every_n_steps=1)
        fit_tiny(module, tiny_data, max_steps=2, accelerator="gpu", devices=1, callbacks=[callback])
        assert callback.num_updates == 2
        initial = module.reference.initial_model
        assert next(initial.parameters()).device.type == ("cpu" if offload else "cuda")
        module.cuda()  # what a device move does to it: nothing when offloaded
        assert next(initial.parameters()).device.type == ("cpu" if offload else "cuda")
        gc.collect()  # the trainer and its optimizer state, which hold reference cycles
        torch.cuda.synchronize()
        allocated[offload] = torch.cuda.memory_allocated()
        del module, callback, initial
        torch.cuda.empty_cache()
    initial_bytes = sum(p.numel() * 2 for p in make_module(tiny_model).policy.parameters())
    assert allocated[False] - allocated[True] == pytest.approx(initial_bytes, rel=0.05)
