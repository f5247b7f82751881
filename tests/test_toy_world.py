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
from lightning_refdpo.data.toy import (
    BACKGROUNDS,
    COLOURS,
    EVAL_PROMPTS,
    POSITIONS,
    SHAPES,
    TRAIN_PROMPTS,
    Prompt,
    all_prompts,
    caption,
    parse_caption,
    render,
    sample_scene,
)
from lightning_refdpo.metrics.toy_reward import ToyReward

os.environ["HF_HUB_OFFLINE"] = "1"
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "toy"


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
    assert len(TRAIN_PROMPTS) == 180 and len(EVAL_PROMPTS) == 45
    assert not set(TRAIN_PROMPTS) & set(EVAL_PROMPTS)
    for field in ("shape", "colour", "position", "background"):
        values = {getattr(parse_caption(p), field) for p in EVAL_PROMPTS}
        assert values == {getattr(parse_caption(p), field) for p in TRAIN_PROMPTS}


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
    batch = scenes(60)
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
        assert (rewards(images, wrong) < truth - 0.15).all(), field

    pixels = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])
    noisy = (
        pixels / 255 + 0.15 * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))
    ).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(pixels / 255, 3, stride=1, padding=1, count_include_pad=False)
    noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(1))
    assert rewards(blurred, prompts).mean() < truth.mean() - 0.02
    assert rewards(noisy, prompts).mean() < truth.mean() - 0.2
    assert rewards(noise, prompts).max() < 0.15


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
    prompt = EVAL_PROMPTS[0]
    images = generate(pipeline, [(prompt, 7), (TRAIN_PROMPTS[0], 8), (prompt, 7)], config)
    assert images.shape == (3, 3, 32, 32)
    # one generator per image: the same (prompt, seed) gives the same image whatever its batch
    alone = generate(pipeline, [(prompt, 7)], config)[0]
    assert torch.allclose(images[0], alone, atol=1e-5)
    assert torch.allclose(images[0], images[2], atol=1e-5)


@pytest.mark.parametrize("split, prompts", [("train", TRAIN_PROMPTS), ("validation", EVAL_PROMPTS)])
def test_shipped_preferences(split, prompts):
    import datasets

    data = datasets.Dataset.from_parquet(str(ASSETS / "data" / f"{split}.parquet"))
    check_schema(data, split)
    columns = data.to_dict()
    assert set(columns["caption"]) <= set(prompts)
    assert {type(v) for v in columns["jpg_0"] + columns["jpg_1"]} == {bytes}
    assert set(columns["label_0"]) <= {0.0, 0.5, 1.0}

    rows = data.select(range(min(len(data), 300))).to_dict()
    images = [decode_image(v) for v in rows["jpg_0"] + rows["jpg_1"]]
    assert images[0].size == (32, 32) and isinstance(images[0], Image.Image)
    scores = rewards(images, rows["caption"] * 2).view(2, -1)
    assert torch.allclose(scores, torch.tensor([rows["reward_0"], rows["reward_1"]]), atol=1e-5)

    flipped = torch.tensor(rows["flipped"])
    strict = torch.tensor(rows["label_0"]) != 0.5
    winner_first = torch.tensor(rows["label_0"]) == 1.0
    winner = torch.where(winner_first, scores[0], scores[1])
    loser = torch.where(winner_first, scores[1], scores[0])
    assert (winner[strict & ~flipped] > loser[strict & ~flipped]).all()
    assert (winner[flipped] < loser[flipped]).all()
    assert 0.0 < flipped.float().mean() < 0.25


def test_demo_trains_through_the_cli_and_reports_before_and_after(tmp_path, monkeypatch):
    from lightning_refdpo import toy_demo

    monkeypatch.chdir(ASSETS.parents[1])
    results = toy_demo.main(
        [
            "--max-prompts=2",
            "--eval-seeds=2",
            f"--output={tmp_path / 'demo'}",
            "--trainer.max_steps=2",
            "--data.init_args.train_batch_size=16",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=false",
        ]
    )
    assert results["held_out_prompts"] == 2 and results["seeds"] == [0, 1]
    assert 0.0 <= results["win_rate"] <= 1.0
    assert results["gain"] == pytest.approx(results["reward_mean"] - results["baseline_reward_mean"])
    assert results["reward_mean"] != results["baseline_reward_mean"]  # the policy was trained
    assert (tmp_path / "demo" / "before_after.png").exists()
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["win_rate"] == results["win_rate"]
