"""The toy world: scenes and captions, ToyReward, the shipped toy model and preference set."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_refdpo.data.preference import check_schema, decode_image
from lightning_refdpo.metrics import win_outcomes
from lightning_refdpo.toy.evaluate import attribute_summary, bootstrap_ci, gain_in_std
from lightning_refdpo.toy.reward import WEIGHTS, ToyReward
from lightning_refdpo.toy.world import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZE_RANGE,
    TEST_PROMPTS,
    TRAIN_PROMPTS,
    VALIDATION_PROMPTS,
    Prompt,
    all_prompts,
    caption,
    parse_caption,
    perturb,
    render,
    sample_scene,
)

os.environ["HF_HUB_OFFLINE"] = "1"
ASSETS = Path(__file__).resolve().parents[2] / "assets" / "toy"


def scenes(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def rewards(images, prompts) -> torch.Tensor:
    reward = ToyReward()
    reward.update(images, prompts)
    return reward.scores()


def test_caption_round_trip():
    prompts = all_prompts()
    assert len(set(prompts)) == len(SHAPES) * len(COLOURS) * len(POSITIONS) * len(BACKGROUNDS)
    for prompt in prompts:
        assert parse_caption(caption(prompt)) == prompt
    scene = scenes(1)[0]
    assert parse_caption(caption(scene)) == Prompt(
        scene.shape, scene.colour, scene.position, scene.background
    )
    assert parse_caption("Grey background; a BLUE square, center") == Prompt(
        "square", "blue", "centre", "gray"
    )


@pytest.mark.parametrize(
    "text",
    [
        "a red circle on the left",
        "a red blue circle on the left, white background",
        "a cat, white background",
    ],
)
def test_parse_caption_refuses_incomplete_captions(text):
    with pytest.raises(ValueError, match="caption"):
        parse_caption(text)


def test_split_is_disjoint_and_covers_every_value():
    assert (len(TRAIN_PROMPTS), len(VALIDATION_PROMPTS), len(TEST_PROMPTS)) == (150, 30, 45)
    splits = [set(TRAIN_PROMPTS), set(VALIDATION_PROMPTS), set(TEST_PROMPTS)]
    assert set.union(*splits) == {caption(p) for p in all_prompts()}
    assert sum(map(len, splits)) == len(all_prompts())
    for field in ("shape", "colour", "position", "background"):
        values = [{getattr(parse_caption(p), field) for p in split} for split in splits]
        assert values[0] == values[1] == values[2]


def test_caption_noise_changes_only_the_named_attributes():
    rng = np.random.default_rng(0)
    prompt = parse_caption(TRAIN_PROMPTS[0])
    assert perturb(prompt, rng, {"colour": 0.0}) == prompt
    changed = [perturb(prompt, rng, {"colour": 1.0}) for _ in range(50)]
    assert all(c.colour != prompt.colour for c in changed)
    assert all(dataclasses.replace(c, colour=prompt.colour) == prompt for c in changed)
    assert {c.colour for c in changed} == set(COLOURS) - {prompt.colour}
    share = np.mean([perturb(prompt, rng, {"shape": 0.3}).shape != prompt.shape for _ in range(2000)])
    assert share == pytest.approx(0.3, abs=0.04)
    with pytest.raises(ValueError, match="caption noise names 'size'"):
        perturb(prompt, rng, {"size": 0.5})


def test_render_draws_the_scene():
    scene = dataclasses.replace(scenes(1)[0], shape="square", position="centre", size=12.0, dx=0.0, dy=0.0)
    pixels = np.asarray(render(scene))
    assert pixels.shape == (32, 32, 3)
    assert tuple(pixels[0, 0]) == BACKGROUNDS[scene.background]
    assert tuple(pixels[16, 16]) == COLOURS[scene.colour]
    assert (np.abs(pixels.astype(int) - COLOURS[scene.colour]).sum(-1) == 0).sum() == pytest.approx(
        144, abs=24
    )


def test_reward_orders_right_and_wrong_images():
    batch = [dataclasses.replace(s, size=SIZE_RANGE[1]) for s in scenes(60)]
    images = [render(s) for s in batch]
    prompts = [caption(s) for s in batch]
    truth = rewards(images, prompts)
    assert truth.min() > 0.9 and truth.mean() > 0.97

    rng = np.random.default_rng(1)
    for field, values in (("shape", SHAPES), ("colour", COLOURS), ("position", POSITIONS)):
        wrong = [
            caption(
                dataclasses.replace(s, **{field: rng.choice([v for v in values if v != getattr(s, field)])})
            )
            for s in batch
        ]
        assert (rewards(images, wrong) < truth - 0.6 * WEIGHTS[field]).all(), field

    pixels = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])
    noisy = (
        pixels / 255 + 0.15 * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))
    ).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(pixels / 255, 3, stride=1, padding=1, count_include_pad=False)
    noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(1))
    assert rewards(blurred, prompts).mean() < truth.mean() - 0.15 * WEIGHTS["clean"]
    assert rewards(noisy, prompts).mean() < truth.mean() - 0.2
    assert rewards(noise, prompts).max() < 0.15


@pytest.mark.parametrize("shape", SHAPES)
def test_size_part_measures_the_uncaptioned_object_size(shape):
    """The global quality: 0 for the world's smallest objects, 1 for its largest, linear in the side
    length in between (a triangle measures ~0.6 px short: its apex is partly covered)."""
    sizes = np.linspace(*SIZE_RANGE, 9)
    batch = [
        dataclasses.replace(s, shape=shape, size=float(z))
        for s, z in zip(scenes(9, seed=3), sizes, strict=True)
    ]
    parts = ToyReward().parts(
        torch.stack([torch.from_numpy(np.array(render(s))).permute(2, 0, 1) for s in batch]) / 255,
        [caption(s) for s in batch],
    )
    expected = torch.from_numpy((sizes - SIZE_RANGE[0]) / (SIZE_RANGE[1] - SIZE_RANGE[0])).float()
    assert torch.allclose(parts["size"], expected, atol=0.04 if shape != "triangle" else 0.17)
    assert (parts["size"].diff() > 0).all() and (parts["score"].diff() > 0).all()
    assert (parts["colour"] == 1).all() and (parts["shape"] > 0.9).all() and (parts["position"] > 0.9).all()


def test_reward_accepts_pil_uint8_and_float():
    batch = scenes(4, seed=2)
    images = [render(s) for s in batch]
    prompts = [caption(s) for s in batch]
    uint8 = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])
    expected = rewards(images, prompts)
    assert expected.shape == (4,)
    assert set(ToyReward().parts(uint8, prompts)) >= {"background", "colour", "shape", "position", "score"}
    assert all(v.shape == (4,) for v in ToyReward().parts(uint8, prompts).values())
    assert torch.allclose(rewards(uint8, prompts), expected)
    assert torch.allclose(rewards(uint8.float() / 255, prompts), expected)
    assert ((expected >= 0) & (expected <= 1)).all()
    reward = ToyReward()
    reward.update(images[0], prompts[0])
    assert reward.compute() == pytest.approx(expected[0].item())


def test_shipped_model_loads_and_generates():
    from diffusers import StableDiffusionPipeline

    from lightning_refdpo.evaluation import GenerationConfig, generate, load_pipeline

    model = ASSETS / "model"
    size = sum(f.stat().st_size for f in model.rglob("*.safetensors"))
    assert 0 < size < 20 * 2**20
    pipeline = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, local_files_only=True)
    assert pipeline.vae.config.sample_size == 32

    pipeline = load_pipeline(str(model), "cpu")[0]
    config = GenerationConfig(num_inference_steps=2, batch_size=3)
    prompt = TEST_PROMPTS[0]
    images = generate(pipeline, [(prompt, 7), (TRAIN_PROMPTS[0], 8), (prompt, 7)], config)
    assert images.shape == (3, 3, 32, 32)
    # one generator per image: the same (prompt, seed) gives the same image whatever its batch
    alone = generate(pipeline, [(prompt, 7)], config)[0]
    assert torch.allclose(images[0], alone, atol=1e-5)
    assert torch.allclose(images[0], images[2], atol=1e-5)


@pytest.mark.parametrize("split, prompts", [("train", TRAIN_PROMPTS), ("validation", VALIDATION_PROMPTS)])
def test_shipped_preferences(split, prompts):
    import datasets

    data = datasets.Dataset.from_parquet(str(ASSETS / "data" / f"{split}.parquet"))
    check_schema(data, split, ("latents_0", "latents_1"))
    columns = data.to_dict()
    assert set(columns["caption"]) <= set(prompts)
    assert {type(v) for v in columns["jpg_0"] + columns["jpg_1"]} == {bytes}
    assert set(columns["label_0"]) <= {0.0, 0.5, 1.0}
    assert len(set(columns["generator_0"]) | set(columns["generator_1"])) >= 3  # a pool, like Pick-a-Pic

    rows = data.select(range(min(len(data), 200))).to_dict()
    images = [decode_image(v) for v in rows["jpg_0"] + rows["jpg_1"]]
    assert images[0].size == (32, 32) and isinstance(images[0], Image.Image)
    scores = rewards(images, rows["caption"] * 2).view(2, -1)
    assert torch.allclose(scores, torch.tensor([rows["reward_0"], rows["reward_1"]]), atol=1e-5)
    labels = torch.tensor(rows["label_0"])
    flipped = torch.tensor(rows["flipped"])
    strict = labels != 0.5
    winner_first = labels == 1.0
    winner = torch.where(winner_first, scores[0], scores[1])
    loser = torch.where(winner_first, scores[1], scores[0])
    assert (winner[strict & ~flipped] > loser[strict & ~flipped]).all()
    assert (winner[flipped] < loser[flipped]).all()
    assert 0.0 < flipped.float().mean() < 0.25


def test_shipped_latents_decode_to_the_stored_images():
    """The latents shipped with the pairs are the images' own: the VAE decodes them into the PNGs."""
    import datasets
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ASSETS / "model", subfolder="vae", local_files_only=True)
    rows = datasets.Dataset.from_parquet(str(ASSETS / "data" / "validation.parquet")).select(range(16))
    latents = torch.tensor(np.asarray(list(rows["latents_0"]) + list(rows["latents_1"]), dtype=np.float32))
    assert latents.shape == (32, 4, 8, 8)
    with torch.no_grad():
        decoded = (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    stored = torch.stack(
        [
            torch.from_numpy(np.asarray(decode_image(v))).permute(2, 0, 1)
            for v in [*rows["jpg_0"], *rows["jpg_1"]]
        ]
    )
    assert (decoded * 255 - stored.float()).abs().max() <= 1.0


def test_win_rate_interval_and_gain_helpers():
    scores = torch.tensor([1.0, 0.0, 2.0, 2.0])
    assert win_outcomes(scores, torch.tensor([0.0, 1.0, 2.0, 1.0])).tolist() == [1.0, 0.0, 0.5, 1.0]
    always = torch.ones(5, 9, 4)
    assert bootstrap_ci(always) == (1.0, 1.0)
    outcomes = (torch.rand(5, 45, 4, generator=torch.Generator().manual_seed(0)) < 0.7).double()
    low, high = bootstrap_ci(outcomes)
    assert low < float(outcomes.mean()) < high and 0.6 < low and high < 0.8
    gains = torch.tensor([[0.1, 0.3], [0.1, 0.3]])
    assert gain_in_std(gains, torch.zeros(2, 2)) == pytest.approx(0.2 / torch.tensor([0.1, 0.3]).std().item())
    parts = {
        k: torch.tensor([0.2, 0.6, 1.0])
        for k in ("size", "position", "colour", "shape", "clean", "background")
    }
    summary = attribute_summary(parts)
    assert summary["shape"] == {"mean": pytest.approx(0.6), "correct": pytest.approx(2 / 3)}


def test_training_on_shipped_latents_skips_the_vae(tmp_path, monkeypatch):
    """``data.latent_columns``: batches carry the latents and the module never calls the VAE encoder."""
    from lightning_refdpo.data import PreferenceDataModule
    from lightning_refdpo.module import DiffusionDPOModule

    data = PreferenceDataModule(
        "parquet",
        data_files={"train": str(ASSETS / "data" / "validation.parquet")},
        validation_split=None,
        resolution=32,
        random_flip=False,
        latent_columns=("latents_0", "latents_1"),
        train_batch_size=4,
        num_workers=0,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["latents_w"].shape == (4, 4, 8, 8) and "pixel_values" not in batch
    module = DiffusionDPOModule(str(ASSETS / "model"))
    monkeypatch.setattr(
        module.backbone.vae, "encode", lambda *a, **k: pytest.fail("the VAE encoder was called")
    )
    latents_w, latents_l, _ = module.backbone.encode_batch(batch)
    scale = module.backbone.vae.config.scaling_factor
    assert torch.allclose(latents_w, batch["latents_w"] * scale) and torch.allclose(
        latents_l, batch["latents_l"] * scale
    )
    with pytest.raises(ValueError, match="random_flip"):
        PreferenceDataModule(random_flip=True, latent_columns=("latents_0", "latents_1"))
    missing = PreferenceDataModule(
        "parquet",
        data_files={"train": str(ASSETS / "data" / "validation.parquet")},
        validation_split=None,
        random_flip=False,
        latent_columns=("latents_a", "latents_b"),
    )
    with pytest.raises(ValueError, match="latents_a, latents_b named by data.latent_columns"):
        missing.setup("fit")


def test_demo_trains_through_the_cli_and_reports_a_verdict(tmp_path, monkeypatch):
    from lightning_refdpo.toy import demo

    monkeypatch.chdir(ASSETS.parents[1])
    results = demo.main(
        [
            "--max_prompts=2",
            "--eval_seeds=2",
            f"--output={tmp_path / 'demo'}",
            "--overrides=[--trainer.max_steps=2, --data.init_args.train_batch_size=16]",
            f"--overrides+=--trainer.default_root_dir={tmp_path / 'run'}",
            "--overrides+=--trainer.enable_progress_bar=false",
            "--overrides+=--trainer.enable_checkpointing=false",
            "--overrides+=--trainer.logger=false",
        ]
    )
    assert results["test_prompts"] == 2 and results["seeds"] == [0, 1]
    assert results["overrides"][:2] == ["--trainer.max_steps=2", "--data.init_args.train_batch_size=16"]
    assert len(results["overrides"]) == 6
    low, high = results["win_rate_ci"]
    assert 0.0 <= low <= results["win_rate"] <= high <= 1.0
    assert results["gain"] == pytest.approx(results["reward_mean"] - results["baseline_reward_mean"])
    assert results["reward_mean"] != results["baseline_reward_mean"]  # the policy was trained
    assert results["verdict"].startswith("verdict: PASS" if results["passed"] else "verdict: FAIL")
    assert set(results["attributes"]) == {"size", "position", "colour", "shape", "clean", "background"}
    assert (tmp_path / "demo" / "before_after.png").exists()
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["win_rate"] == results["win_rate"]
