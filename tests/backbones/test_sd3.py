"""SD3 / SD3.5 (rectified flow) on a tiny SD3 built offline: the flow target against independent
code, every loss, the reference update, the latent cache, export through diffusers' own API and
an exact resume."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

from lightning_refdpo import ReferenceModelUpdate, lora
from lightning_refdpo.export import export_checkpoint
from lightning_refdpo.losses import LOSS_TYPES
from lightning_refdpo.sd3 import StableDiffusion3DPOModule
from lightning_refdpo.sources import pipeline_from_export
from lightning_refdpo.testing import save_tiny_sd3
from tests.helpers import (
    assert_same_step,
    build_recipe,
    cache_pairs,
    fit_tiny,
    make_batch,
    make_module,
    validate_with_evaluation,
)

CONFIGS = Path(__file__).parents[2] / "configs"


def sd3(path: str, **kwargs) -> StableDiffusion3DPOModule:
    return make_module(path, StableDiffusion3DPOModule, **kwargs)


def images(pipeline, prompt: str = "a red square") -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipeline(
        prompt, num_inference_steps=2, guidance_scale=4.5, generator=generator, output_type="np"
    ).images


def test_flow_forward_process_target_and_timesteps_follow_the_rectified_flow_formula(tiny_sd3):
    backbone = sd3(tiny_sd3).backbone
    T, shift = 1000, backbone.noise_scheduler.config.shift
    t = torch.tensor([0, 250, 999])
    u = (t.double() + 1) / T
    sigma = (shift * u / (1 + (shift - 1) * u)).float().view(-1, 1, 1, 1)
    latents, noise = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    torch.testing.assert_close(backbone.add_noise(latents, noise, t), (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(backbone.diffusion_target(latents, noise, t), noise - latents)
    torch.testing.assert_close(backbone.denoiser_timesteps(t), sigma.flatten() * T)
    assert backbone.denoiser_timesteps(t)[-1] == T, "t = T-1 is pure noise, the transformer's timestep 1000"
    vae = backbone.vae.config
    z = torch.randn(1, 16, 8, 8)
    torch.testing.assert_close(backbone.scale_latents(z), (z - vae.shift_factor) * vae.scaling_factor)


def test_prompt_encoding_matches_the_pipeline_with_and_without_t5(tiny_sd3):
    for use_t5 in (True, False):
        module = sd3(tiny_sd3, use_t5=use_t5)
        captions = ["a red square", ""]
        ours = module.backbone.encode_prompts(captions)
        embeds, _, pooled, _ = module.build_pipeline().encode_prompt(
            captions, None, None, do_classifier_free_guidance=False, max_sequence_length=256
        )
        torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
        torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0, atol=0)
    assert module.backbone.text_encoder_3 is None and ours["encoder_hidden_states"][:, -256:].abs().max() == 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_trains_and_only_sft_skips_the_reference_forward(tiny_sd3, loss_type):
    module = sd3(tiny_sd3, loss_type=loss_type, reward_scale=True)
    forwards = []
    predict = module.backbone.predict
    module.backbone.predict = lambda denoiser, *args: forwards.append(denoiser) or predict(denoiser, *args)
    batch = make_batch()
    out = module.preference_step(batch, batch["timesteps"])
    out.loss.mean().backward()
    assert torch.isfinite(out.loss).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.parameters())
    reference = [] if loss_type == "sft" else [module.reference.model]
    assert forwards == [module.policy, *reference]


@pytest.mark.parametrize("module_kwargs", [{}, {"lora_rank": 2}], ids=["full", "lora"])
def test_training_steps_and_reference_update(tiny_sd3, tiny_data, module_kwargs):
    module = sd3(tiny_sd3, learning_rate=0.01, reward_scale=True, **module_kwargs)
    callback = ReferenceModelUpdate(every_n_steps=1)
    trainer = fit_tiny(module, tiny_data, max_steps=2, callbacks=[callback])
    assert trainer.global_step == 2 and callback.num_updates == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and callback.last_divergence != 0
    reference, policy = (
        module.reference.reference_parameters(module.policy),
        (
            lora.adapter_parameters(module.policy, lora.POLICY)
            if module.uses_lora
            else module.policy.state_dict()
        ),
    )
    assert all(torch.equal(reference[k], p) for k, p in policy.items()), "reference <- policy at step 2"


def test_latent_cache_gives_the_uncached_step(tiny_sd3, tiny_data, tmp_path):
    module = sd3(tiny_sd3, lora_rank=2)
    pairs = cache_pairs(module, tiny_data, tmp_path / "cache")
    assert set(pairs.empty_prompt) == {"encoder_hidden_states", "pooled_projections"}
    assert_same_step(module, pairs.uncached, pairs.cached, torch.tensor([10, 500, 999]))


@pytest.mark.parametrize("module_kwargs", [{"lora_rank": 2, "lora_alpha": 4}, {}], ids=["lora", "full"])
def test_export_loads_with_diffusers_and_gives_the_modules_images(
    tiny_sd3, tiny_data, tmp_path, module_kwargs
):
    module = sd3(tiny_sd3, learning_rate=0.01, **module_kwargs)
    trainer = fit_tiny(module, tiny_data, max_steps=2, default_root_dir=tmp_path)
    ckpt = tmp_path / "policy.ckpt"
    trainer.save_checkpoint(ckpt)
    expected = images(module.eval().build_pipeline())
    output = export_checkpoint(str(ckpt), output=str(tmp_path / "export"))

    if module.uses_lora:
        pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
        pipeline.load_lora_weights(str(output))
    else:
        pipeline = pipeline_from_export(output)
    pipeline.scheduler = module.build_pipeline().scheduler
    np.testing.assert_allclose(images(pipeline), expected, atol=1e-5)
    assert images(StableDiffusion3Pipeline.from_pretrained(tiny_sd3)).tolist() != expected.tolist()
    assert "StableDiffusion3Pipeline" in (output / "README.md").read_text()

    whole = export_checkpoint(str(ckpt), output=str(tmp_path / "whole"), pipeline=True)
    pipeline = DiffusionPipeline.from_pretrained(str(whole))
    assert type(pipeline) is StableDiffusion3Pipeline and not any(
        "lora" in k for k in pipeline.transformer.state_dict()
    )
    pipeline.scheduler = module.build_pipeline().scheduler
    np.testing.assert_allclose(images(pipeline), expected, atol=1e-4)


def test_resume_continues_exactly(tiny_sd3, tiny_data, tmp_path):
    """Four steps in one run, and the same run resumed from its checkpoint of step 2: same weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)  # the LoRA initialisation
    straight = sd3(tiny_sd3, lora_rank=2, learning_rate=0.01)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    callbacks = [ReferenceModelUpdate(every_n_steps=2), checkpoint]
    fit_tiny(straight, tiny_data, max_steps=4, callbacks=callbacks, enable_checkpointing=True)

    resumed = sd3(tiny_sd3, lora_rank=2, learning_rate=0.01)
    ckpt = next(tmp_path.glob("*step=2.ckpt"))
    fit_tiny(
        resumed,
        tiny_data,
        max_steps=4,
        callbacks=[ReferenceModelUpdate(every_n_steps=2)],
        ckpt_path=str(ckpt),
    )
    for key in resumed.checkpoint_keys():
        torch.testing.assert_close(resumed.state_dict()[key], straight.state_dict()[key], rtol=0, atol=0)


@pytest.mark.parametrize("overlays", [[], ["refdpo"], ["lora"], ["refdpo", "lora"]], ids="+".join)
def test_sd3_recipes_build_the_sd3_module(overlays, tiny_sd3, tiny_data, tmp_path):
    configs = [CONFIGS / "sd3" / f"{name}.yaml" for name in ("dpo", *overlays)]
    cli = build_recipe(configs, tiny_sd3, tiny_data, tmp_path)
    assert type(cli.model) is StableDiffusion3DPOModule and cli.model.hparams.beta == 100
    assert cli.model.uses_lora == ("lora" in overlays)
    if cli.model.uses_lora:
        adapted = {
            name.rsplit(".", 1)[-1] for name, m in cli.model.policy.named_modules() if hasattr(m, "lora_A")
        }
        assert {"add_q_proj", "to_add_out", "to_q"} <= adapted, "both attention streams"
    sampler = type(cli.datamodule.timestep_sampler).__name__
    assert sampler == ("DiscountedTimestepSampler" if "refdpo" in overlays else "LogitNormalTimestepSampler")


def test_evaluation_callback_generates_with_the_sd3_pipeline_and_its_sampler(tiny_sd3, tiny_data, tmp_path):
    trainer, callback = validate_with_evaluation(sd3(tiny_sd3, lora_rank=2), tiny_data, tmp_path)
    metrics = trainer.callback_metrics
    assert metrics["eval/Brightness"].item() == pytest.approx(metrics["eval/initial/Brightness"].item())
    assert callback.baseline_images.shape == (2, 3, 32, 32)
    assert (callback.config.guidance_scale, callback.config.scheduler) == (
        4.5,
        "FlowMatchEulerDiscreteScheduler",
    )


def test_sd35_blocks_train_with_both_attentions_adapted(tiny_data, tmp_path):
    """SD3.5 Medium's MMDiT-X (a second attention in the first blocks, RMS-normed q/k)."""
    path = save_tiny_sd3(tmp_path / "model", dual_attention_layers=(0,), qk_norm="rms_norm")
    module = sd3(str(path), lora_rank=2, learning_rate=0.01)
    adapted = {name for name, m in module.policy.named_modules() if hasattr(m, "lora_A")}
    assert any(".attn2." in name for name in adapted) and any(name.endswith("add_q_proj") for name in adapted)
    trainer = fit_tiny(module, tiny_data, max_steps=2, callbacks=[ReferenceModelUpdate(every_n_steps=1)])
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_a_latent_cache_of_another_family_is_refused_by_name(tiny_sd3):
    module = sd3(tiny_sd3)
    batch = {
        "caption": ["x"],
        **{
            k: torch.zeros(1, 16, 16, 16)
            for k in ("latents_mean_w", "latents_std_w", "latents_mean_l", "latents_std_l")
        },
        "encoder_hidden_states": torch.zeros(1, 16 + 256, 64),  # an SD1.5 / SDXL cache: no pooled_projections
    }
    with pytest.raises(
        KeyError, match="no pooled_projections column: it was written for another model family"
    ):
        module.backbone.encode_batch(batch)
