"""Image grids with captions, logged to every logger that takes images and saved as PNG."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lightning_refdpo.metrics import to_pil_images


def image_grid(
    images: torch.Tensor | Sequence[Image.Image], captions: Sequence[str], columns: int = 4
) -> Image.Image:
    """A grid of images with each caption written under its image, wrapped between words."""
    pil = to_pil_images(images) if isinstance(images, torch.Tensor) else list(images)
    width, height = pil[0].size
    chars_per_line = max(4, width // 6)
    wrapped = [textwrap.wrap(caption, chars_per_line, break_long_words=False) for caption in captions]
    caption_height = 12 * max(1, *map(len, wrapped)) + 4
    rows = -(-len(pil) // columns)
    grid = Image.new("RGB", (columns * width, rows * (height + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(pil, wrapped, strict=True)):
        x, y = (i % columns) * width, (i // columns) * (height + caption_height)
        grid.paste(image, (x, y))
        draw.text((x + 2, y + height + 2), "\n".join(lines), fill="black")
    return grid


def log_image(trainer, tag: str, image: Image.Image, step: int) -> Path:
    """Log ``image`` to every logger that takes images (W&B-style ``log_image``, TensorBoard) and
    save it as a PNG under the log directory; return the PNG's path."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, np.asarray(image), step, dataformats="HWC")
        elif hasattr(logger, "log_image"):
            logger.log_image(key=tag, images=[image], step=step)
    path = (
        Path(trainer.log_dir or trainer.default_root_dir)
        / "images"
        / f"{tag.replace('/', '_')}_step{step}.png"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
