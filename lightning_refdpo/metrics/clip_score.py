"""CLIP score (Hessel et al., 2021, "CLIPScore", arXiv 2104.08718), on the 0-100 scale of torchmetrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_refdpo.metrics._clip import CLIPEmbedder
from lightning_refdpo.metrics.base import RewardScore

#: ViT size letter of each vision width (OpenAI CLIP B: 768, L: 1024; LAION H: 1280)
VIT_SIZES = {768: "B", 1024: "L", 1280: "H"}


class CLIPScore(RewardScore):
    r"""Text-image alignment as scaled CLIP cosine similarity, one value per image.

    .. math:: \mathrm{CLIPScore}(x, c) = 100 \max(\cos(E_I(x), E_T(c)), 0)

    the formula of :class:`torchmetrics.multimodal.CLIPScore` (the scale diffusion papers report,
    e.g. 33.84), with OpenAI's CLIP ViT-L/14 by default (Diffusion-DPO's CLIP metric is
    :class:`~lightning_refdpo.metrics.OpenCLIPScore`, ViT-H-14). The backbone is part of :attr:`name`. It is computed here rather than through
    torchmetrics because that class keeps only a running sum (no per-image scores), loads only
    the hub ids it knows (not a local folder), and in torchmetrics 1.9 breaks on transformers 5,
    whose ``get_image_features`` returns a model output instead of a tensor. One difference: the clamp
    at 0 applies to each image, where torchmetrics clamps the mean; they differ only when some
    cosine is negative.

    Args:
        model_name_or_path: hub id or local folder of the ``CLIPModel`` (default ``openai/clip-vit-large-patch14``).
        processor_name_or_path: hub id or local folder of its processor (default: the model's).
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(
        self,
        model_name_or_path: str = "openai/clip-vit-large-patch14",
        processor_name_or_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.clip = CLIPEmbedder(
            model_name_or_path,
            processor_name_or_path or model_name_or_path,
            scorer="CLIPScore",
            model_argument="model_name_or_path",
            processor_argument="processor_name_or_path" if processor_name_or_path else "model_name_or_path",
        )

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cosine = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        return 100.0 * cosine.clamp(min=0.0)

    @property
    def name(self) -> str:
        """``CLIPScore-<backbone>`` in open_clip's spelling, e.g. ``CLIPScore-ViT-L-14``."""
        vision = self.clip.model.config.vision_config
        size = VIT_SIZES.get(vision.hidden_size, str(vision.hidden_size))
        return f"CLIPScore-ViT-{size}-{vision.patch_size}"
