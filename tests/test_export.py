"""``lightning-refdpo export``: folders that diffusers loads with its own API and that generate the
images of the trained module, and ``pipeline_from_export`` / ``load_module`` to load them back."""

import json

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open

from lightning_refdpo import ReferenceModelUpdate
from lightning_refdpo.cli import run_cli
from lightning_refdpo.evaluation import GenerationConfig, generate
from lightning_refdpo.sdxl import StableDiffusionXLDPOModule
from lightning_refdpo.sources import load_module, pipeline_from_export
from tests.helpers import fit_tiny, make_module

ITEMS = [("a red cat", 0), ("a blue dog", 1)]
SAMPLER = GenerationConfig(num_inference_steps=2, guidance_scale=5.0, resolution=32, batch_size=2)


def train_and_checkpoint(module, tiny_data, tmp_path):
    trainer = fit_tiny(module, tiny_data, max_steps=2, callbacks=[ReferenceModelUpdate(every_n_steps=1)])
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    return str(tmp_path / "last.ckpt")


def images(pipeline):
    return generate(pipeline, ITEMS, SAMPLER)


def test_sdxl_lora_export_loads_with_load_lora_weights_and_reproduces_the_module(
    tiny_sdxl, tiny_data, tmp_path
):
    module = make_module(tiny_sdxl, StableDiffusionXLDPOModule, lora_rank=2, lora_alpha=4, learning_rate=0.05)
    ckpt = train_and_checkpoint(module, tiny_data, tmp_path)
    export, whole = tmp_path / "export", tmp_path / "whole"
    run_cli(["export", ckpt, f"--output={export}"])
    run_cli(["export", ckpt, f"--output={whole}", "--pipeline=true"])
    ours = images(module.eval().build_pipeline())

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    base = images(pipeline)
    pipeline.load_lora_weights(str(export))
    torch.testing.assert_close(images(pipeline), ours, rtol=0, atol=1e-6)
    assert (base - ours).abs().max() > 1e-2, "the trained LoRA changes the images"
    assert not (export / "model_index.json").exists(), "no whole pipeline unless asked"

    with safe_open(str(export / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert f.keys() and not any("reference" in k for k in f.keys()), "the policy adapter only"
    merged = DiffusionPipeline.from_pretrained(str(whole))
    assert isinstance(merged, StableDiffusionXLPipeline)
    assert not any("lora" in k for k in merged.unet.state_dict()), "the LoRA is merged into the UNet"
    torch.testing.assert_close(images(merged), ours, rtol=0, atol=1e-4)
    for source in (export, ckpt):
        torch.testing.assert_close(images(pipeline_from_export(source)), ours, rtol=0, atol=1e-6)

    card = (export / "README.md").read_text()
    assert f"base_model: {tiny_sdxl}" in card and "- lora" in card and "stable-diffusion-xl" in card
    assert "reference model updated to the policy" in card and "(2 updates" in card
    assert "| `lora_alpha` | `4` |" in card and "load_lora_weights" in card


def test_full_unet_export_replaces_the_pipeline_unet(tiny_model, tiny_data, tmp_path):
    module = make_module(tiny_model, learning_rate=0.05, reward_scale=True)
    ckpt = train_and_checkpoint(module, tiny_data, tmp_path)
    results = {
        "model": ckpt,
        "baseline": "initial model of the checkpoint",
        "prompt_sets": {
            "partiprompts": {
                "num_prompts": 2,
                "num_images": 4,
                "scores": {"PickScore": {"model_mean": 21.5, "baseline_mean": 21.0, "win_rate": 0.75}},
            }
        },
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    export = tmp_path / "export"
    run_cli(["export", ckpt, f"--output={export}", f"--evaluation={tmp_path / 'results.json'}"])
    assert not (export / "model_index.json").exists(), "no whole pipeline unless asked"
    ours = images(module.eval().build_pipeline())

    unet = UNet2DConditionModel.from_pretrained(str(export), subfolder="unet")
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, unet=unet)
    torch.testing.assert_close(images(pipeline), ours, rtol=0, atol=1e-6)
    assert (images(StableDiffusionPipeline.from_pretrained(tiny_model)) - ours).abs().max() > 1e-2
    torch.testing.assert_close(images(pipeline_from_export(export)), ours, rtol=0, atol=1e-6)
    info = json.loads((export / "export.json").read_text())
    (export / "export.json").write_text(json.dumps({**info, "base_model": str(tmp_path / "moved_away")}))
    moved = pipeline_from_export(export, base_model=tiny_model)
    torch.testing.assert_close(images(moved), ours, rtol=0, atol=1e-6)

    card = (export / "README.md").read_text()
    assert "full fine-tuning of the UNet2DConditionModel" in card and "reward scale" in card
    snippet = card.split("```python\n")[1].split("\n```")[0].replace("EXPORT_DIR", str(export))
    namespace = {}
    exec(snippet.replace("float16", "float32").replace(".to('cuda')", "").rsplit("\n", 1)[0], namespace)
    torch.testing.assert_close(images(namespace["pipeline"]), ours, rtol=0, atol=1e-6)
    assert "| PickScore |" in card and "75.0%" in card, "the evaluation figures"
    assert type(load_module(ckpt)) is type(module)
