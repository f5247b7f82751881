"""Shared base for reward scorers: a torchmetrics ``Metric`` that keeps one score per image."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

ImageInput = torch.Tensor | Sequence[Image.Image] | Image.Image


def to_float_images(images: ImageInput) -> torch.Tensor:
    """Return images as a float tensor ``(N, 3, H, W)`` in ``[0, 1]``.

    Accepts a uint8 tensor (``0..255``), a float tensor (``[0, 1]``), a single PIL image or a
    sequence of PIL images. A 3-d tensor is taken as one image.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, torch.Tensor):
        arrays = [np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images]
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float().clamp(0.0, 1.0)


class RewardScore(Metric):
    """A reward model as a metric: ``update(images, prompts)`` scores each image against its prompt.

    ``compute()`` returns the mean score over everything seen (on every DDP rank, after the
    gather of torchmetrics); ``scores()`` returns the per-image scores in the order they came.
    Subclasses implement ``score(images, prompts) -> Tensor[N]`` on float images in ``[0, 1]``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("per_image", default=[], dist_reduce_fx="cat")

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-image scores for float images ``(N, 3, H, W)`` in ``[0, 1]`` and ``N`` prompts."""

    def update(self, images: ImageInput, prompts: str | Sequence[str]) -> None:
        images = to_float_images(images).to(self.device)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
        with torch.no_grad():
            self.per_image.append(self.score(images, prompts).detach().float().flatten())

    def scores(self) -> torch.Tensor:
        """All per-image scores seen so far, concatenated (gathered across ranks when synced)."""
        return dim_zero_cat(self.per_image) if self.per_image else torch.empty(0, device=self.device)

    def compute(self) -> torch.Tensor:
        return self.scores().mean()
