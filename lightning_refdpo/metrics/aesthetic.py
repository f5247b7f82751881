"""LAION aesthetic score: the "improved aesthetic predictor" over CLIP ViT-L/14 image embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_refdpo.metrics._clip import CLIPEmbedder
from lightning_refdpo.metrics._hub import hub_file
from lightning_refdpo.metrics._mlp import RatingMLP
from lightning_refdpo.metrics.base import RewardScore, freeze


class AestheticScore(RewardScore):
    r"""Aesthetic rating (about 1-10) of an image, independent of the prompt.

    .. math:: \mathrm{Aesthetic}(x) = \mathrm{MLP}\big(E_I(x) / \lVert E_I(x) \rVert_2\big)

    with :math:`E_I` the image embedding of OpenAI CLIP ViT-L/14 and the MLP of
    https://github.com/christophschuhmann/improved-aesthetic-predictor (``simple_inference.py``),
    trained on SAC + LAION-Logos + AVA (``sac+logos+ava1-l14-linearMSE.pth``). The MLP input size
    follows the CLIP projection dimension (768 for ViT-L/14). Prompts are not read, so ``update``
    may be called with images only.

    Args:
        clip_name_or_path: hub id or local folder of the ``CLIPModel`` and its processor
            (default ``openai/clip-vit-large-patch14``).
        predictor_path: local path of the MLP state dict; when ``None`` it is fetched from the hub.
        predictor_repo_id: hub repo holding the MLP weights (default ``camenduru/improved-aesthetic-predictor``).
        predictor_filename: file name in that repo (default ``sac+logos+ava1-l14-linearMSE.pth``).
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    needs_prompts = False

    def __init__(
        self,
        clip_name_or_path: str = "openai/clip-vit-large-patch14",
        predictor_path: str | None = None,
        predictor_repo_id: str = "camenduru/improved-aesthetic-predictor",
        predictor_filename: str = "sac+logos+ava1-l14-linearMSE.pth",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.clip = CLIPEmbedder(
            clip_name_or_path,
            clip_name_or_path,
            scorer="AestheticScore",
            model_argument="clip_name_or_path",
            processor_argument="clip_name_or_path",
        )
        if predictor_path is None:
            predictor_path = hub_file(
                predictor_repo_id, predictor_filename, what="aesthetic predictor", argument="predictor_path"
            )
        self.mlp = RatingMLP(self.clip.model.config.projection_dim)
        self.mlp.load_state_dict(torch.load(predictor_path, map_location="cpu", weights_only=True))
        freeze(self.mlp)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.mlp(self.clip.image_embeds(images))
