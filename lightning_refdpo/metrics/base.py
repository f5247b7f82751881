"""Shared base for reward scorers: a torchmetrics ``Metric`` that keeps one score per image."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
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


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """Float images ``(N, 3, H, W)`` in ``[0, 1]`` as 8-bit RGB PIL images, rounded as diffusers saves them.

    Reward models were trained and are reported on 8-bit images opened with PIL, so their own
    PIL-based preprocessing is applied to these; a uint8 or PIL input comes back unchanged.
    """
    pixels = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return [Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def freeze(module: nn.Module) -> nn.Module:
    """Put a reward model in eval mode with gradients off, and return it."""
    return module.eval().requires_grad_(False)


class RewardScore(Metric):
    """A reward model as a metric: ``update(images, prompts)`` scores each image against its prompt.

    ``compute()`` returns the mean score over everything seen (on every DDP rank, after the
    gather of torchmetrics); ``scores()`` returns the per-image scores in the order they came
    (rank by rank under DDP). Subclasses implement ``score(images, prompts) -> Tensor[N]`` on
    float images in ``[0, 1]``, and keep their reward model as frozen submodules (see
    :func:`freeze`).

    The reward model moves with the metric (``.to(device)``) but stays out of ``state_dict()``,
    so a LightningModule holding this metric does not write the reward weights into every
    checkpoint, and loading such a checkpoint keeps the weights loaded at construction. It also
    stays in eval mode when a parent module calls ``.train()``, so dropout never perturbs scores.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    #: whether ``score`` reads the prompts; a scorer that does not may be updated with images only
    needs_prompts = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("per_image", default=[], dist_reduce_fx="cat")

    @property
    def name(self) -> str:
        """The metric's name in logs, tables and JSON: the class name, plus the version or backbone
        for scorers that have several."""
        return type(self).__name__

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-image scores for float images ``(N, 3, H, W)`` in ``[0, 1]`` and ``N`` prompts."""

    def update(self, images: ImageInput, prompts: str | Sequence[str] | None = None) -> None:
        images = to_float_images(images).to(self.device)
        if prompts is None:
            if self.needs_prompts:
                raise ValueError(
                    f"{type(self).__name__} scores images against prompts; pass one prompt per image"
                )
            prompts = [""] * images.shape[0]
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image"
            )
        with torch.no_grad():
            self.per_image.append(self.score(images, prompts).detach().float().flatten())

    def scores(self) -> torch.Tensor:
        """All per-image scores seen so far, concatenated; under DDP, gathered from every rank."""
        if self._is_synced:
            return self._local_scores()
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            return self._local_scores()

    def _local_scores(self) -> torch.Tensor:
        # a list of per-batch tensors, or one tensor once a DDP sync has concatenated them
        if isinstance(self.per_image, list) and not self.per_image:
            return torch.empty(0, device=self.device)
        return dim_zero_cat(self.per_image)

    def compute(self) -> torch.Tensor:
        return self._local_scores().mean()

    def train(self, mode: bool = True) -> RewardScore:
        return super().train(False)

    def state_dict(
        self, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        destination = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [key for key in destination if self._is_reward_model_key(key, prefix)]:
            del destination[key]
        return destination

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # the reward weights were left out of the saved state: fill them from this instance so a
        # strict load does not report them missing (and an older checkpoint that has them still loads)
        for key, value in nn.Module.state_dict(self, prefix=prefix, keep_vars=True).items():
            if self._is_reward_model_key(key, prefix):
                state_dict.setdefault(key, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _is_reward_model_key(self, key: str, prefix: str) -> bool:
        return key.startswith(prefix) and key[len(prefix) :].split(".", 1)[0] in self._modules
