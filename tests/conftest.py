"""Shared fixtures: tiny SD-shaped models and preference sets, saved and loaded back offline."""

from __future__ import annotations

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
