"""``StableDiffusionXLDPOModule``: the DPO module on the SDXL backbone (``backbones/sdxl.py``)."""

from __future__ import annotations

from typing import Any

from lightning_refdpo.backbones import StableDiffusionXLBackbone
from lightning_refdpo.module import DiffusionDPOModule


class StableDiffusionXLDPOModule(DiffusionDPOModule):
    """Diffusion-DPO and the method of arXiv 2505.18736 for SDXL (two text encoders, pooled text
    embedding, size and crop micro-conditioning).

    Args:
        pretrained_model_name_or_path: hub id or folder in the SDXL diffusers layout (the SD1.5
            layout plus ``text_encoder_2`` and ``tokenizer_2``).
        vae_name_or_path: see :class:`DiffusionDPOModule`; the SDXL configs use
            ``madebyollin/sdxl-vae-fp16-fix`` (the SDXL VAE gives NaNs in fp16).
        micro_conditioning: ``"fixed"`` (Diffusion-DPO: ``(res, res, 0, 0, res, res)`` for every
            image) or ``"per_image"`` (each image's own size and crop), see ``backbones/sdxl.py``.
        **kwargs: every other argument of :class:`DiffusionDPOModule`.
    """

    backbone_class = StableDiffusionXLBackbone

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-xl-base-1.0",
        vae_name_or_path: str | None = None,
        micro_conditioning: str = "fixed",
        **kwargs: Any,
    ) -> None:
        StableDiffusionXLBackbone.check_micro_conditioning(micro_conditioning)
        super().__init__(
            pretrained_model_name_or_path=pretrained_model_name_or_path,
            vae_name_or_path=vae_name_or_path,
            **kwargs,
        )

    def backbone_options(self) -> dict[str, Any]:
        return {"micro_conditioning": self.hparams.micro_conditioning}
