"""Human Preference Score v2.0 / v2.1 (Wu et al., 2023, "Human Preference Score v2", arXiv 2306.09341)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_refdpo.metrics._hub import hub_file
from lightning_refdpo.metrics._open_clip import cosine_score, import_open_clip
from lightning_refdpo.metrics.base import RewardScore, freeze

#: checkpoint file of each HPS version in the hub repo ``xswu/HPSv2`` (``hps_version_map`` of the hpsv2 package)
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSv2(RewardScore):
    r"""HPS v2.0 / v2.1: an open_clip ViT-H-14 fine-tuned on human preference pairs (HPD v2).

    .. math:: \mathrm{HPS}(x, c) = 100 \cos(E_I(x), E_T(c))

    100 times the diagonal of ``image_features @ text_features.T`` of the unit-norm open_clip
    features that ``hpsv2.score`` reports (https://github.com/tgxs002/HPSv2, ``img_score.py``), the
    scale of the papers' tables (e.g. 27.19). The two versions are different models whose scores
    cannot be compared (SD1.4: 26.95 on v2.0, 25.35 on v2.1); v2.0 is the one of ``hpsv2.score``
    and of Diffusion-DPO, so the default. The version is part of :attr:`name`. As in ``hpsv2``, the architecture is built without pretrained weights, the
    checkpoint's ``state_dict`` is loaded into it, images go through open_clip's validation
    transform as 8-bit PIL images and prompts through the architecture's open_clip tokenizer. The
    model runs in float32 here, where ``hpsv2`` uses CUDA autocast.

    Needs ``open_clip`` (``pip install 'lightning-refdpo[hpsv2]'``).

    Args:
        version: ``"v2.0"`` (default) or ``"v2.1"``; picks the checkpoint file in ``repo_id``.
        checkpoint_path: local path of an HPS checkpoint (a dict with a ``state_dict``); when
            ``None`` it is fetched from the hub.
        architecture: open_clip model name the checkpoint belongs to (default ``ViT-H-14``).
        repo_id: hub repo holding the checkpoints (default ``xswu/HPSv2``).
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(
        self,
        version: str = "v2.0",
        checkpoint_path: str | None = None,
        architecture: str = "ViT-H-14",
        repo_id: str = "xswu/HPSv2",
        **kwargs: Any,
    ) -> None:
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"unknown HPS version {version!r}; choose one of {sorted(HPS_CHECKPOINTS)}")
        open_clip = import_open_clip("HPSv2")
        super().__init__(**kwargs)
        self.version = version
        if checkpoint_path is None:
            checkpoint_path = hub_file(
                repo_id, HPS_CHECKPOINTS[version], what="HPS checkpoint", argument="checkpoint_path"
            )
        model, _, self.preprocess = open_clip.create_model_and_transforms(architecture, pretrained=None)
        model.load_state_dict(
            torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
        )
        self.model = freeze(model)
        self.tokenizer = open_clip.get_tokenizer(architecture)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return cosine_score(self.model, self.tokenizer, self.preprocess, images, prompts)

    @property
    def name(self) -> str:
        """``HPSv2.0`` or ``HPSv2.1``."""
        return f"HPSv{self.version[1:]}"
