"""SDXL on a tiny SDXL-shaped model: conditioning, training with reference updates, the latent cache
and the evaluation callback."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from lightning_refdpo import ReferenceModelUpdate, lora
from lightning_refdpo.cli import run_cli
from lightning_refdpo.data.latent_cache import CachedPreferenceCollator
from lightning_refdpo.data.preference import PairTransform, PreferenceCollator
from lightning_refdpo.sdxl import StableDiffusionXLDPOModule
from tests.helpers import (
    assert_same_step,
    build_recipe,
    cache_pairs,
    fit_tiny,
    make_module,
    unet_weights,
    validate_with_evaluation,
)

CONFIGS = Path(__file__).parents[2] / "configs"


def sdxl(model_path, **kwargs) -> StableDiffusionXLDPOModule:
    return make_module(model_path, StableDiffusionXLDPOModule, **kwargs)


def cropped_pairs(transform, sizes):
    """Collated pairs of blank images of the given (width, height) of winner and loser, as the data
    loader makes them."""
    pairs = [
        {"caption": f"a photo {i}", **transform(Image.new("RGB", winner), Image.new("RGB", loser))}
        for i, (winner, loser) in enumerate(sizes)
    ]
    return PreferenceCollator()(pairs)


def test_conditioning_matches_the_sdxl_pipeline_and_carries_each_images_crop(tiny_sdxl):
    module = sdxl(tiny_sdxl, lora_rank=2, micro_conditioning="per_image")
    torch.manual_seed(0)
    transform = PairTransform(32, random_crop=True, random_flip=False)
    batch = cropped_pairs(transform, [((48, 40), (32, 32)), ((32, 64), (80, 32))])
    _, _, cond = module.backbone.encode_batch(batch)

    embeds, _, pooled, _ = module.build_pipeline().encode_prompt(
        batch["caption"], device="cpu", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["text_embeds"], pooled)
    assert embeds.shape[-1] == 64, "both encoders' hidden states, concatenated"
    # (orig_h, orig_w, crop_top, crop_left, target_h, target_w) of each image, the crop taken by the loader
    for row, key in ((0, "time_ids"), (1, "loser_time_ids")):
        sizes, corners = batch["original_size"][:, row], batch["crop_top_left"][:, row]
        expected = torch.cat([sizes, corners, torch.tensor([[32, 32]] * 2)], 1)
        assert torch.equal(cond[key], expected.float())
    assert cond["time_ids"][:, :2].tolist() == [[40, 48], [64, 32]]
    assert cond["loser_time_ids"][:, :2].tolist() == [[32, 32], [32, 80]]

    other_crop = {**batch, "crop_top_left": batch["crop_top_left"] + 1}
    t = torch.tensor([500, 500])
    a = module.preference_step(batch, t, generator=torch.Generator().manual_seed(0)).mse_w
    b = module.preference_step(other_crop, t, generator=torch.Generator().manual_seed(0)).mse_w
    assert not torch.allclose(a, b), "the crop coordinates reach the UNet"


def test_a_bfloat16_reference_sees_the_exact_sizes_and_crop(tiny_sdxl):
    """bf16 rounds 1023 to 1024: the time ids must reach every UNet in float32."""
    module = sdxl(tiny_sdxl, frozen_dtype="bfloat16", micro_conditioning="per_image")
    seen = []
    module.reference.model.add_time_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    batch = {
        "caption": ["x"],
        "pixel_values": torch.zeros(1, 6, 32, 32),
        "original_size": torch.tensor([[[1023, 777], [640, 513]]]),
        "crop_top_left": torch.tensor([[[257, 0], [0, 3]]]),
    }
    module.preference_step(batch, torch.tensor([500]))
    assert seen[0].dtype == torch.float32
    assert seen[0].tolist() == [1023, 777, 257, 0, 32, 32, 640, 513, 0, 3, 32, 32], "winner, then loser"


def test_fixed_micro_conditioning_is_the_default(tiny_sdxl):
    """Diffusion-DPO's SDXL training: (res, res, 0, 0, res, res) for every image, whatever its size."""
    module = sdxl(tiny_sdxl, lora_rank=2)
    seen = []
    module.policy.add_time_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    batch = cropped_pairs(PairTransform(32, random_crop=True), [((48, 40), (32, 64))])
    module.preference_step(batch, torch.tensor([500]))
    assert seen[-1].tolist() == [32, 32, 0, 0, 32, 32] * 2
    module.preference_step({"caption": ["x"], "pixel_values": torch.zeros(1, 6, 32, 32)}, torch.tensor([1]))
    for config in sorted((CONFIGS / "sdxl").glob("*.yaml")):  # the base and its overlays
        model = yaml.safe_load(config.read_text()).get("model", {}).get("init_args", {})
        assert model.get("micro_conditioning", "fixed") == "fixed", config


def test_per_image_batches_without_crop_information_are_refused(tiny_sdxl):
    module = sdxl(tiny_sdxl, lora_rank=2, micro_conditioning="per_image")
    with pytest.raises(KeyError, match="original_size and crop_top_left"):
        module.backbone.encode_batch({"caption": ["x"], "pixel_values": torch.zeros(1, 6, 32, 32)})
    old_layout = {"original_size": torch.zeros(1, 2), "crop_top_left": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="rebuild the latent cache"):
        module.backbone.encode_batch(
            {"caption": ["x"], "pixel_values": torch.zeros(1, 6, 32, 32), **old_layout}
        )


def test_sd15_model_is_refused_by_the_sdxl_module(tiny_model):
    with pytest.raises(ValueError, match="pretrained_model_name_or_path .* has no SDXL UNet"):
        sdxl(tiny_model)


@pytest.mark.parametrize("module_kwargs", [{}, {"lora_rank": 2}], ids=["full", "lora"])
def test_training_steps_and_reference_update(tiny_sdxl, tiny_data, module_kwargs):
    module = sdxl(tiny_sdxl, learning_rate=0.01, **module_kwargs)
    initial = unet_weights(module.policy)
    callback = ReferenceModelUpdate(every_n_steps=1)
    trainer = fit_tiny(module, tiny_data, max_steps=2, callbacks=[callback])
    assert trainer.global_step == 2 and callback.num_updates == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(v, initial[k]) for k, v in module.policy.state_dict().items())
    if module.uses_lora:
        reference = lora.adapter_parameters(module.policy, lora.REFERENCE)
        policy = lora.adapter_parameters(module.policy, lora.POLICY)
    else:
        reference, policy = (
            dict(module.reference.model.named_parameters()),
            dict(module.policy.named_parameters()),
        )
    assert all(torch.equal(reference[k], p) for k, p in policy.items()), "reference <- policy at step 2"
    assert not any(k.startswith("text_encoder_2.") for k in module.checkpoint_keys())


def test_latent_cache_holds_both_embeddings_the_pooled_one_and_the_crop(tiny_sdxl, tiny_data, tmp_path):
    module = sdxl(tiny_sdxl, lora_rank=2)
    pairs = cache_pairs(module, tiny_data, tmp_path / "cache")
    assert set(pairs.empty_prompt) == {"encoder_hidden_states", "text_embeds"}
    assert torch.equal(pairs.cached["original_size"], pairs.uncached["original_size"])
    assert_same_step(module, pairs.uncached, pairs.cached, torch.tensor([10, 500, 990]))

    dropped = CachedPreferenceCollator(pairs.empty_prompt)(
        [{**row, "drop_caption": True} for row in pairs.rows[:1]]
    )
    assert torch.equal(dropped["text_embeds"][0], pairs.empty_prompt["text_embeds"])


def test_evaluation_callback_generates_with_the_sdxl_pipeline(tiny_sdxl, tiny_data, tmp_path):
    trainer, callback = validate_with_evaluation(sdxl(tiny_sdxl, lora_rank=2), tiny_data, tmp_path)
    metrics = trainer.callback_metrics
    assert metrics["eval/Brightness"].item() == pytest.approx(metrics["eval/initial/Brightness"].item())
    assert callback.baseline_images.shape == (2, 3, 32, 32)
    assert (callback.config.guidance_scale, callback.config.scheduler) == (5.0, "DDPMScheduler"), (
        "SDXL: guidance 5 with the base model's own scheduler (the tiny model's is DDPM)"
    )


@pytest.mark.parametrize("overlays", [[], ["refdpo"], ["refdpo", "lora"]], ids=["dpo", "refdpo", "lora"])
def test_sdxl_configs_build_the_sdxl_module_at_1024_px(overlays, tiny_sdxl, tiny_data, tmp_path):
    base = CONFIGS / "sdxl" / "dpo.yaml"
    assert yaml.safe_load(base.read_text())["model"]["init_args"]["vae_name_or_path"] == (
        "madebyollin/sdxl-vae-fp16-fix"
    )
    configs = [base, *(CONFIGS / "sdxl" / f"{name}.yaml" for name in overlays)]
    cli = build_recipe(
        configs, tiny_sdxl, tiny_data, tmp_path, f"--model.init_args.vae_name_or_path={tiny_sdxl}/vae"
    )
    assert type(cli.model) is StableDiffusionXLDPOModule
    assert cli.model.uses_lora == ("lora" in overlays)
    assert cli.datamodule.hparams.resolution == 1024
    caps = [c.max_divergence for c in cli.trainer.callbacks if isinstance(c, ReferenceModelUpdate)]
    assert caps == ([0.002] if "refdpo" in overlays else [])


def test_cache_command_then_fit_from_cache(tiny_sdxl, tiny_data, tmp_path):
    common = [
        f"--config={CONFIGS / 'tiny.yaml'}",
        "--model.class_path=lightning_refdpo.sdxl.StableDiffusionXLDPOModule",
        f"--model.init_args.pretrained_model_name_or_path={tiny_sdxl}",
        f"--data.init_args.data_files={json.dumps(tiny_data)}",
        "--data.init_args.random_crop=true",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    path = run_cli(["cache", *common, f"--output={tmp_path / 'cache'}"]).result
    cli = run_cli(["fit", *common, f"--data.init_args.latent_cache={path}", "--trainer.max_steps=2"])
    assert type(cli.model) is StableDiffusionXLDPOModule
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
