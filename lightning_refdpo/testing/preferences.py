"""Preference sets in the Pick-a-Pic v2 schema, and unpaired labelled images, with random images, for
tests and the tiny config."""

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
    rng = np.random.default_rng(seed)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for _ in range(num_pairs):
        rows["caption"].append(random_caption(rng))
        rows["jpg_0"].append(random_image(rng, resolution))
        rows["jpg_1"].append(random_image(rng, resolution))
        rows["label_0"].append(0.5 if rng.random() < tie_fraction else float(rng.integers(0, 2)))
    return save_rows(rows, path)


def save_random_labeled_images(
    path: str | Path,
    num_images: int = 24,
    resolution: int = 32,
    desirable_fraction: float = 0.6,
    seed: int = 0,
) -> Path:
    """Write a parquet file of unpaired labelled images (``caption``, ``image``, ``label``: 1
    desirable, 0 undesirable; ``data.unpaired``) with random images; the first image is desirable and
    the second undesirable, the others desirable with probability ``desirable_fraction``."""
    rng = np.random.default_rng(seed)
    rows = {"caption": [], "image": [], "label": []}
    for i in range(num_images):
        rows["caption"].append(random_caption(rng))
        rows["image"].append(random_image(rng, resolution))
        rows["label"].append(int(i == 0 or (i > 1 and rng.random() < desirable_fraction)))
    return save_rows(rows, path)


WORDS = ["a", "red", "blue", "green", "cat", "dog", "house", "tree", "on", "the", "hill", "photo"]


def random_caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=rng.integers(2, 6)))


def random_image(rng: np.random.Generator, resolution: int) -> bytes:
    pixels = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
    return encode_image(Image.fromarray(pixels))


def save_rows(rows: dict[str, list], path: str | Path) -> Path:
    import datasets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    return path
