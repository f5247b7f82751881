"""Preference sets in the Pick-a-Pic v2 schema with random images, for tests and the tiny config."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def encode_image(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def save_random_preference_set(
    path: str | Path,
    num_pairs: int = 32,
    resolution: int = 32,
    tie_fraction: float = 0.1,
    seed: int = 0,
) -> Path:
    """Write a parquet file in the Pick-a-Pic v2 schema (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``)
    with random images of ``resolution`` px; ``tie_fraction`` of the pairs are ties (``label_0 = 0.5``)."""
    import datasets

    rng = np.random.default_rng(seed)
    words = ["a", "red", "blue", "green", "cat", "dog", "house", "tree", "on", "the", "hill", "photo"]

    def image() -> bytes:
        pixels = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
        return encode_image(Image.fromarray(pixels))

    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for _ in range(num_pairs):
        rows["caption"].append(" ".join(rng.choice(words, size=rng.integers(2, 6))))
        rows["jpg_0"].append(image())
        rows["jpg_1"].append(image())
        rows["label_0"].append(0.5 if rng.random() < tie_fraction else float(rng.integers(0, 2)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    return path
