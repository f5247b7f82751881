"""CLIP score with an open_clip model: Diffusion-DPO's CLIP metric, ViT-H-14 trained on LAION-2B."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_refdpo.hub import ModelLoadError
from lightning_refdpo.metrics._open_clip import cosine_score, import_open_clip
from lightning_refdpo.metrics.base import RewardScore, freeze


class OpenCLIPScore(RewardScore):
    r"""Text-image alignment as 100 times the raw cosine of open_clip embeddings, one value per image.

    .. math:: \mathrm{CLIP}(x, c) = 100 \cos(E_I(x), E_T(c))

    the CLIP metric of Diffusion-DPO's evaluation (open_clip ``ViT-H-14``, weights
    ``laion2B-s32B-b79K``): images through the model's open_clip validation transform as 8-bit PIL
    images, prompts through its open_clip tokenizer, features divided by their L2 norm. Unlike
    :class:`~lightning_refdpo.metrics.CLIPScore` (OpenAI ViT-L/14, torchmetrics' formula) there is no
    clamp at 0. The backbone is part of :attr:`name`.

    Needs ``open_clip`` (``pip install 'lightning-refdpo[hpsv2]'``).

    Args:
        architecture: open_clip model name (default ``ViT-H-14``).
        pretrained: open_clip pretrained tag (default ``laion2B-s32B-b79K``, fetched from the hub
            and cached) or the path of a local checkpoint file.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(
        self, architecture: str = "ViT-H-14", pretrained: str = "laion2B-s32B-b79K", **kwargs: Any
    ) -> None:
        open_clip = import_open_clip("OpenCLIPScore")
        super().__init__(**kwargs)
        self.architecture = architecture
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                architecture, pretrained=pretrained
            )
        except (OSError, RuntimeError) as err:
            raise ModelLoadError(
                f"could not load OpenCLIPScore weights {pretrained!r} of {architecture!r} (offline or "
                "missing); pass pretrained=<local checkpoint file>, or run once online to fill the "
                "Hugging Face cache"
            ) from err
        self.model = freeze(model)
        self.tokenizer = open_clip.get_tokenizer(architecture)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return cosine_score(self.model, self.tokenizer, self.preprocess, images, prompts)

    @property
    def name(self) -> str:
        """``CLIPScore-<architecture>``, e.g. ``CLIPScore-ViT-H-14``."""
        return f"CLIPScore-{self.architecture}"
