"""Preference pairs in the Pick-a-Pic v2 schema, loaded with ``datasets.load_dataset``.

Schema: ``caption`` (str), ``jpg_0`` and ``jpg_1`` (encoded image bytes, an ``Image`` feature or a
file path) and ``label_0`` (1.0: image 0 preferred, 0.0: image 1 preferred, 0.5: tie, dropped).
A set made by a generator can also ship each image's VAE latent (two more columns, e.g.
``latents_0`` and ``latents_1``: the unscaled ``latent_dist.mean`` or the sampler's final latent
divided by the VAE's ``scaling_factor``); with ``latent_columns`` the pairs carry those latents
instead of pixels and training skips the VAE round trip.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from lightning_refdpo.data.draws import PairDraws

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
TIE = 0.5


def check_schema(
    dataset: Any, split: str, latent_columns: Sequence[str] = (), source: str | None = None
) -> None:
    """Refuse a split that lacks a Pick-a-Pic v2 column, or one of the ``latent_columns`` asked for,
    naming the split, its ``source`` (files or dataset name), the column and what was found."""
    columns = dataset.column_names
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    where = f"preference split {split!r}" + (f" ({source})" if source else "")
    if any(c not in columns for c in latent_columns):
        raise ValueError(
            f"{where} lacks column(s) {', '.join(c for c in latent_columns if c not in columns)} "
            f"named by data.latent_columns; found {', '.join(columns)}. Drop data.latent_columns to encode the images."
        )
    if missing:
        unpaired = (
            " (these look like unpaired labelled images: set data.unpaired: true)"
            if "image" in columns
            else ""
        )
        raise ValueError(
            f"{where} lacks column(s) {', '.join(missing)}; found {', '.join(columns)}{unpaired}. "
            "Rename them to the Pick-a-Pic v2 schema (caption, jpg_0, jpg_1, label_0), e.g. with "
            "dataset.rename_column."
        )
    check_label_type(dataset, split, "label_0", "1, 0 or 0.5")


def check_label_type(dataset: Any, split: str, column: str, values: str) -> None:
    """Refuse a label ``column`` that is not numeric, naming the ``values`` it must hold."""
    feature = dataset.features[column]
    label_type = str(feature.dtype) if hasattr(feature, "dtype") else ""
    if not label_type.startswith(("float", "int", "bool")):
        raise ValueError(
            f"column {column} of split {split!r} must be numeric ({values}), got {label_type or 'a non-value feature'}"
        )


LABELS = (0.0, TIE, 1.0)


def check_labels(
    dataset: Any,
    split: str,
    column: str = "label_0",
    allowed: Sequence[float] = LABELS,
    meaning: str = "1 (image 0 preferred), 0 (image 1 preferred) or 0.5 (tie)",
) -> None:
    """Refuse ``column`` values other than ``allowed`` (NaN included), naming the first rows: a 0.7
    or a 2 is not a preference this loss can read, and would silently become a win."""
    bad = [(i, x) for i, x in enumerate(dataset[column]) if not any(x == label for label in allowed)]
    if bad:
        rows = ", ".join(f"row {i}: {x}" for i, x in bad[:10])
        raise ValueError(
            f"column {column} of split {split!r} must be {meaning}; {len(bad)} row(s) are not "
            f"({rows}{', ...' if len(bad) > 10 else ''})"
        )


def drop_ties(dataset: Any, split: str) -> Any:
    """Drop pairs with ``label_0 == 0.5`` (Diffusion-DPO trains on strict preferences only)."""
    kept = dataset.filter(lambda labels: [x != TIE for x in labels], input_columns="label_0", batched=True)
    if len(kept) == 0:
        raise ValueError(f"every pair of split {split!r} is a tie (label_0 == 0.5): nothing to learn from")
    return kept


def caption_of(row: dict[str, Any]) -> str:
    """The row's caption; ``""`` where it is missing (``None``)."""
    return row["caption"] if isinstance(row["caption"], str) else ""


def decode_image(value: Any) -> Image.Image:
    """Decode a Pick-a-Pic image cell: bytes, ``{"bytes": ..., "path": ...}``, a PIL image or a path."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, bytes | bytearray):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, dict):
        image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    elif isinstance(value, str):
        image = Image.open(value)
    else:
        raise TypeError(f"cannot decode an image from {type(value).__name__}")
    image.load()
    return image.convert("RGB")


@dataclass
class PairTransform:
    """Winner and loser transformed independently, as the Diffusion-DPO training script transforms
    the two images of a pair: each image's shorter side resized to ``resolution``, a square cropped
    by the image's own box (centre, or with ``random_crop`` a corner drawn for that image), then a
    horizontal flip with p = 0.5 drawn for each image (``shared_flip``: one flip for both). Pixels
    go to ``[-1, 1]``.

    Per image (row 0 the winner, row 1 the loser) it also returns SDXL's micro-conditioning:
    ``original_size`` ``(2, 2)``, the ``(h, w)`` before resizing, and ``crop_top_left`` ``(2, 2)``,
    the ``(top, left)`` of the crop in the resized image.
    """

    resolution: int = 512
    random_crop: bool = False
    random_flip: bool = True
    shared_flip: bool = False

    def __call__(
        self, winner: Image.Image, loser: Image.Image, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Crop corners, then the flips, are drawn from ``generator`` (the pair's, see ``draws.py``)."""
        originals = [(image.height, image.width) for image in (winner, loser)]
        resized = [self._resize(winner), self._resize(loser)]
        corners = [self._crop_corner(image, generator) for image in resized]
        flips = self._flips(generator)
        tensors = []
        for image, (top, left), flip in zip(resized, corners, flips, strict=True):
            image = image.crop((left, top, left + self.resolution, top + self.resolution))
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
            tensors.append(torch.from_numpy(array).permute(2, 0, 1))
        return {
            "pixel_values": torch.cat(tensors),
            "original_size": torch.tensor(originals),
            "crop_top_left": torch.tensor(corners),
        }

    def _resize(self, image: Image.Image) -> Image.Image:
        scale = self.resolution / min(image.size)
        size = (
            max(self.resolution, round(image.width * scale)),
            max(self.resolution, round(image.height * scale)),
        )
        return image.resize(size, Image.Resampling.BILINEAR)

    def _crop_corner(self, image: Image.Image, generator: torch.Generator | None) -> tuple[int, int]:
        if not self.random_crop:
            return (image.height - self.resolution) // 2, (image.width - self.resolution) // 2
        top = int(torch.randint(0, image.height - self.resolution + 1, (), generator=generator))
        left = int(torch.randint(0, image.width - self.resolution + 1, (), generator=generator))
        return top, left

    def _flips(self, generator: torch.Generator | None) -> list[bool]:
        if not self.random_flip:
            return [False, False]
        draws = torch.rand(1 if self.shared_flip else 2, generator=generator) < 0.5
        return [bool(draws[0]), bool(draws[-1])]


class PreferencePairs(torch.utils.data.Dataset):
    """Pairs as ``{"caption", "pixel_values" (6, H, W: winner then loser), ...}``.

    An image that cannot be decoded makes the pair ``None``; the collator drops and counts it.
    With ``draws`` (training), crop, flip, caption dropout, ``t`` and the noise seed come from the
    pair's own generator (:class:`~lightning_refdpo.data.draws.PairDraws`). With ``latent_columns``
    (the columns of image 0's and image 1's latents) a pair is ``{"caption", "latents_w",
    "latents_l"}`` and no image is decoded.
    """

    def __init__(
        self,
        dataset: Any,
        transform: PairTransform,
        draws: PairDraws | None = None,
        latent_columns: tuple[str, str] | None = None,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.draws = draws
        self.latent_columns = latent_columns

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if self.draws is not None:
            self.draws.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.pair(self.dataset[index], index)

    def pair(self, row: dict[str, Any], index: int) -> dict[str, Any] | None:
        """The pair of ``row``, drawing as pair ``index`` of the epoch; ``None`` if undecodable."""
        caption = caption_of(row)
        generator = self.draws.generator(index) if self.draws is not None else None
        first = row["label_0"] > TIE
        if self.latent_columns:
            latents = [torch.as_tensor(np.asarray(row[c], dtype=np.float32)) for c in self.latent_columns]
            pair = {"caption": caption, "latents_w": latents[1 - first], "latents_l": latents[first]}
        else:
            try:
                image_0, image_1 = decode_image(row["jpg_0"]), decode_image(row["jpg_1"])
            except Exception:  # noqa: BLE001 - any undecodable image is skipped and counted, never fatal
                return None
            winner, loser = (image_0, image_1) if first else (image_1, image_0)
            pair = {"caption": caption, **self.transform(winner, loser, generator)}
        return pair if self.draws is None else {**pair, **self.draws(generator)}


def stack_draws(pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``timesteps`` and ``noise_seeds`` of pairs carrying :class:`PairDraws` (training), else ``{}``."""
    if "timestep" not in pairs[0]:
        return {}
    return {
        "timesteps": torch.stack([torch.as_tensor(p["timestep"]) for p in pairs]),
        "noise_seeds": torch.tensor([p["noise_seed"] for p in pairs]),
    }


class PreferenceCollator:
    """Stacks pairs (pixels, or shipped latents; also unpaired couples), drops undecodable ones
    (``num_skipped``), empties the captions drawn for dropout and stacks the pairs' drawn timesteps
    and noise seeds (training pairs only)."""

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        pairs = [s for s in samples if s is not None]
        batch: dict[str, Any] = {"num_skipped": len(samples) - len(pairs)}
        if not pairs:
            return {**batch, "caption": [], "pixel_values": torch.empty(0)}
        for key in ("caption", "caption_l"):
            if key in pairs[0]:
                batch[key] = ["" if p.get("drop_caption") else p[key] for p in pairs]
        for key in ("pixel_values", "original_size", "crop_top_left", "latents_w", "latents_l"):
            if key in pairs[0]:
                batch[key] = torch.stack([p[key] for p in pairs])
        return {**batch, **stack_draws(pairs)}
