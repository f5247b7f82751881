"""A frozen transformers CLIP model with its processor, giving L2-normalized embeddings (shared by the CLIP scorers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoProcessor, CLIPModel

from lightning_refdpo.metrics._hub import from_pretrained
from lightning_refdpo.metrics.base import freeze, to_pil_images

#: image processor on PIL, as the reference scorers ran (transformers 5 picks torchvision's when
#: installed, transformers 4 a "fast" processor where asked)
PIL_BACKEND = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}


class CLIPEmbedder(nn.Module):
    """``CLIPModel`` + ``AutoProcessor`` loaded by hub id or local folder, frozen.

    Images go through the processor as 8-bit PIL images (the way the reference scorers feed
    files they opened), with the processor's PIL backend (:data:`PIL_BACKEND`), prompts are truncated to the text model's context (77 tokens for CLIP).
    Embeddings are the projected pooled outputs (``get_image_features`` / ``get_text_features``)
    divided by their L2 norm.
    """

    def __init__(
        self,
        model_name_or_path: str,
        processor_name_or_path: str,
        *,
        scorer: str,
        model_argument: str,
        processor_argument: str,
    ) -> None:
        super().__init__()
        self.model = freeze(
            from_pretrained(
                CLIPModel, model_name_or_path, what=f"{scorer} CLIP model", argument=model_argument
            )
        )
        self.processor = from_pretrained(
            AutoProcessor,
            processor_name_or_path,
            what=f"{scorer} CLIP processor",
            argument=processor_argument,
            **PIL_BACKEND,
        )

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``(N, D)`` of float images ``(N, 3, H, W)`` in ``[0, 1]``."""
        pixels = self.processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]
        # projection of the pooled output, spelled out because get_image_features returns a
        # tensor in transformers 4 and a model output in transformers 5
        pooled = self.model.vision_model(
            pixel_values=pixels.to(self.model.device, self.model.dtype)
        ).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``(N, D)`` of ``N`` prompts."""
        tokens = self.processor(
            text=list(prompts),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.model.device)
        pooled = self.model.text_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)
