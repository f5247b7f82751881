"""Shared fixtures: tiny SD-shaped models and preference sets, saved and loaded back offline."""

from __future__ import annotations

import json
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from lightning_refdpo.testing import save_tiny_stable_diffusion

    return str(save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_v_model(tmp_path_factory) -> str:
    from lightning_refdpo.testing import save_tiny_stable_diffusion

    return str(
        save_tiny_stable_diffusion(
            tmp_path_factory.mktemp("tiny_v") / "model", prediction_type="v_prediction"
        )
    )


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    from lightning_refdpo.testing import save_tiny_sdxl

    return str(save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "model"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> str:
    from lightning_refdpo.testing import save_tiny_sd3

    return str(save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "model"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    from lightning_refdpo.testing import save_random_preference_set

    root = tmp_path_factory.mktemp("data")
    return {
        "train": str(save_random_preference_set(root / "train.parquet", num_pairs=24, seed=0)),
        "validation": str(save_random_preference_set(root / "validation.parquet", num_pairs=8, seed=1)),
    }


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny CLIP (width 32, 2 layers, 32 px images, patch 8) with a byte-level CLIP tokenizer, in one
    folder: the reward scorers' CLIP."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = tmp_path_factory.mktemp("tiny-clip")
    characters = list(bytes_to_unicode().values())
    vocab = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: every character is its own token
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)

    torch.manual_seed(0)
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text_config = {
        **layers,
        "vocab_size": len(vocab),
        "max_position_embeddings": 77,
        "bos_token_id": len(vocab) - 2,
        "eos_token_id": len(vocab) - 1,
        "pad_token_id": len(vocab) - 1,
    }
    vision_config = {**layers, "image_size": 32, "patch_size": 8}
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    return str(folder)
