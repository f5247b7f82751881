"""``StableDiffusionXLBackbone``: SDXL (two text encoders, pooled text embedding, micro-conditioning).

SDXL conditions its UNet on three things, computed as in diffusers' ``train_diffusion_dpo_sdxl.py``
and ``StableDiffusionXLPipeline`` (so training and generation agree):

- ``encoder_hidden_states``: the penultimate hidden states of both text encoders concatenated on
  the feature axis (768 + 1280 = 2048 channels for SDXL base);
- ``text_embeds``: the pooled, projected embedding of the second text encoder (1280);
- ``time_ids``: the micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.
  ``micro_conditioning="fixed"`` (Diffusion-DPO's SDXL training, the SDXL recipes):
  ``(res, res, 0, 0, res, res)`` for every image, ``res`` the training resolution.
  ``"per_image"`` (diffusers' ``train_diffusion_dpo_sdxl.py``): each image's own size before
  resizing and the top-left of its own crop (``original_size``, ``crop_top_left`` of the batch,
  winner and loser rows), and the training crop's size.

The last two reach the UNet as ``added_cond_kwargs``. The diffusion process is SD1.5's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_refdpo.backbones.base import LOSER, Conditioning
from lightning_refdpo.backbones.sd15 import StableDiffusionBackbone
from lightning_refdpo.batch import PreferenceBatch

MICRO_CONDITIONING = ("original_size", "crop_top_left")
MICRO_CONDITIONING_MODES = ("fixed", "per_image")


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """The ``StableDiffusionXLPipeline`` layout: the SD1.5 layout plus ``text_encoder_2`` and
    ``tokenizer_2``.

    Args:
        micro_conditioning: ``"fixed"`` (Diffusion-DPO) or ``"per_image"``, see the module docstring.
        **kwargs: those of :class:`~lightning_refdpo.backbones.base.Backbone`.
    """

    def __init__(self, *args: Any, micro_conditioning: str = "fixed", **kwargs: Any) -> None:
        self.check_micro_conditioning(micro_conditioning)
        super().__init__(*args, **kwargs)
        self.micro_conditioning = micro_conditioning

    @staticmethod
    def check_micro_conditioning(mode: str) -> None:
        if mode not in MICRO_CONDITIONING_MODES:
            raise ValueError(
                f"model.micro_conditioning must be one of {', '.join(MICRO_CONDITIONING_MODES)}; got {mode!r}"
            )

    def load_components(self) -> None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        super().load_components()
        unet_config = UNet2DConditionModel.load_config(
            self.pretrained_model_name_or_path, subfolder="unet", revision=self.revision
        )
        if unet_config.get("addition_embed_type") != "text_time":
            raise ValueError(
                f"model.pretrained_model_name_or_path {self.pretrained_model_name_or_path!r} has no SDXL UNet "
                f"(addition_embed_type {unet_config.get('addition_embed_type')!r}, not 'text_time'); use "
                "DiffusionDPOModule for it"
            )
        self.tokenizer_2 = self.load(CLIPTokenizer, "tokenizer_2", weights=False)
        self.text_encoder_2 = self.load(CLIPTextModelWithProjection, "text_encoder_2")

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str]) -> Conditioning:
        """``{"encoder_hidden_states": cat(h1[-2], h2[-2]), "text_embeds": pooled2}``: penultimate
        hidden states of both encoders, and the second encoder's projected pooled output."""
        hidden_states = []
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            out = encoder(self.token_ids(tokenizer, captions), output_hidden_states=True)
            hidden_states.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(hidden_states, dim=-1), "text_embeds": out.text_embeds}

    def prompt_columns(self) -> tuple[str, ...]:
        return ("encoder_hidden_states", "text_embeds")

    def encode_batch(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """SD1.5's latents and text conditioning plus the ``time_ids`` of the winners; per image,
        also ``loser_time_ids`` (which the base's ``pair_conditioning`` puts on the losers)."""
        per_image = self.micro_conditioning == "per_image"
        if per_image:
            check_per_image_sizes(batch)
        latents_w, latents_l, cond = super().encode_batch(batch)
        target_size = [side * self.vae_scale_factor for side in latents_w.shape[-2:]]
        if per_image:
            sizes, corners = batch["original_size"].to(self.device), batch["crop_top_left"].to(self.device)
            cond["time_ids"] = micro_conditioning(sizes[:, 0], corners[:, 0], target_size)
            cond[LOSER + "time_ids"] = micro_conditioning(sizes[:, 1], corners[:, 1], target_size)
        else:
            sizes = torch.tensor(target_size, device=self.device).expand(len(latents_w), 2)
            cond["time_ids"] = micro_conditioning(sizes, torch.zeros_like(sizes), target_size)
        return latents_w, latents_l, cond

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent side (8 for SDXL)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def denoiser_kwargs(self, cond: Conditioning, dtype: torch.dtype) -> dict[str, Any]:
        """The text states, and the pooled embedding and time ids as ``added_cond_kwargs``. The time
        ids stay float32: the UNet embeds them in float32, and bf16 would round sizes and crop
        offsets above 256 (a bf16 reference would then see other sizes than the policy)."""
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].float()}
        return {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype), "added_cond_kwargs": added}

    def build_pipeline(self, denoiser: torch.nn.Module) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=denoiser,
            scheduler=type(self.noise_scheduler).from_config(self.noise_scheduler.config),
            add_watermarker=False,
        )


def check_per_image_sizes(batch: PreferenceBatch) -> None:
    """Refuse a batch without the ``(B, 2, 2)`` sizes and crop corners of winner and loser."""
    missing = [k for k in MICRO_CONDITIONING if k not in batch]
    if missing:
        raise KeyError(
            f"SDXL batches need {' and '.join(missing)} per pair for the per-image micro-conditioning; "
            "PreferenceDataModule provides them (rebuild a latent cache written without them)"
        )
    if batch["original_size"].ndim != 3:
        raise ValueError(
            "per-image micro-conditioning needs original_size and crop_top_left of winner and loser "
            f"(shape (B, 2, 2)), got shape {tuple(batch['original_size'].shape)}; rebuild the latent "
            "cache with this version, or use micro_conditioning: fixed"
        )


def micro_conditioning(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: Sequence[int]
) -> torch.Tensor:
    """SDXL's ``add_time_ids``: rows ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``
    from ``(B, 2)`` original sizes and crop corners and the ``(h, w)`` of the training crop."""
    target = torch.tensor(target_size, device=original_size.device).expand(len(original_size), 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).float()
