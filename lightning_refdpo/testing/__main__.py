"""``python -m lightning_refdpo.testing OUTPUT``: the tiny model and preference set of ``configs/tiny.yaml``."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import auto_cli

from lightning_refdpo.testing.models import save_tiny_stable_diffusion
from lightning_refdpo.testing.preferences import save_random_preference_set


def write_tiny_assets(output: Path, num_pairs: int = 64) -> None:
    """Write ``output/model`` (a tiny SD1.5-shaped pipeline) and ``output/data/{train,validation}.parquet``.

    Args:
        output: folder to write ``model/`` and ``data/`` into.
        num_pairs: training pairs (the validation set has 16).
    """
    output = Path(output)
    save_tiny_stable_diffusion(output / "model")
    save_random_preference_set(output / "data" / "train.parquet", num_pairs=num_pairs, seed=0)
    save_random_preference_set(output / "data" / "validation.parquet", num_pairs=16, seed=1)
    print(f"tiny model and preference set written to {output}")


if __name__ == "__main__":
    auto_cli(write_tiny_assets)
