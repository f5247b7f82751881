"""PickScore (Kirstain et al., 2023, "Pick-a-Pic", arXiv 2305.01569)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_refdpo.metrics._clip import CLIPEmbedder
from lightning_refdpo.metrics.base import RewardScore


class PickScore(RewardScore):
    r"""PickScore: a CLIP-H model fine-tuned on Pick-a-Pic human preferences.

    .. math:: \mathrm{PickScore}(x, c) = e^{\tau} \cos(E_I(x), E_T(c))

    with :math:`e^{\tau}` the model's ``logit_scale.exp()``, as the reference code in
    https://github.com/yuvalkirstain/PickScore computes it (about 100 times the cosine; typical
    values are around 20-23).

    Args:
        model_name_or_path: hub id or local folder of the ``CLIPModel`` (default ``yuvalkirstain/PickScore_v1``).
        processor_name_or_path: hub id or local folder of its processor (default
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, the one the PickScore authors use).
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(
        self,
        model_name_or_path: str = "yuvalkirstain/PickScore_v1",
        processor_name_or_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.clip = CLIPEmbedder(
            model_name_or_path,
            processor_name_or_path,
            scorer="PickScore",
            model_argument="model_name_or_path",
            processor_argument="processor_name_or_path",
        )

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cosine = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        return self.clip.model.logit_scale.exp() * cosine
