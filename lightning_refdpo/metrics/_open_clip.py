"""open_clip, imported on first use: the optional dependency of the open_clip scorers (HPSv2, OpenCLIPScore)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_refdpo.hub import MissingExtraError
from lightning_refdpo.metrics.base import to_pil_images


def import_open_clip(scorer: str) -> Any:
    """The ``open_clip`` module; a missing install names the extra that brings it."""
    try:
        import open_clip
    except ImportError as err:
        raise MissingExtraError(
            f"{scorer} needs open_clip; install the extra: pip install 'lightning-refdpo[hpsv2]' "
            "(package open_clip_torch)"
        ) from err
    return open_clip


def cosine_score(
    model: Any, tokenizer: Any, preprocess: Any, images: torch.Tensor, prompts: Sequence[str]
) -> torch.Tensor:
    """``100 * cos(image embedding, text embedding)`` of an open_clip model: CLIP score and HPSv2
    alike (raw cosine, not clamped at 0)."""
    device = next(model.parameters()).device
    pixels = torch.stack([preprocess(image) for image in to_pil_images(images)]).to(device)
    image_features = model.encode_image(pixels, normalize=True)
    text_features = model.encode_text(tokenizer(list(prompts)).to(device), normalize=True)
    return 100.0 * (image_features * text_features).sum(-1)
