"""``StableDiffusionBackbone``: Stable Diffusion 1.x / 2.x (one CLIP text encoder, a DDPM-trained UNet).

Training follows the diffusers training examples: VAE latents times ``scaling_factor``, ``x_t``
from the scheduler's ``add_noise`` and the target of the scheduler's ``prediction_type``
(``epsilon`` or ``v_prediction``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_refdpo.backbones.base import Backbone, Conditioning
from lightning_refdpo.timesteps import inverse_sqrt_snr, reward_scale_schedule


class StableDiffusionBackbone(Backbone):
    """The ``StableDiffusionPipeline`` layout: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``scheduler`` (loaded as a ``DDPMScheduler``)."""

    def load_components(self) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        self.noise_scheduler = self.load(DDPMScheduler, "scheduler", weights=False)
        self.tokenizer = self.load(CLIPTokenizer, "tokenizer", weights=False)
        self.text_encoder = self.load(CLIPTextModel, "text_encoder")
        self.vae = self.load_vae(AutoencoderKL)

    def load_denoiser(self) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        return self.load(UNet2DConditionModel, "unet")

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str]) -> Conditioning:
        """``{"encoder_hidden_states": ...}``: the text encoder's last hidden states."""
        return {"encoder_hidden_states": self.text_encoder(self.token_ids(self.tokenizer, captions))[0]}

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``."""
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def diffusion_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """``eps`` or ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``, by ``prediction_type``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported scheduler prediction_type {self.prediction_type!r}")

    def reward_scale_schedule(self) -> torch.Tensor:
        """``lambda(t) = 1 + norm(1/sqrt(SNR(t)))`` (``timesteps.reward_scale_schedule``). For a
        zero-terminal-SNR scheduler (``rescale_betas_zero_snr``), ``1/sqrt(SNR)`` is infinite at
        ``T-1`` and explodes near it; it is clipped at the largest value of the same scheduler
        without the rescaling, so ``lambda`` matches that schedule's wherever the two agree in
        range and is 2 on the noisiest steps."""
        config = self.noise_scheduler.config
        cap = None
        if config.get("rescale_betas_zero_snr"):
            plain = type(self.noise_scheduler).from_config(config, rescale_betas_zero_snr=False)
            cap = float(inverse_sqrt_snr(plain.alphas_cumprod).max())
        return reward_scale_schedule(self.noise_scheduler.alphas_cumprod, max_inverse_sqrt_snr=cap)

    def build_pipeline(self, denoiser: torch.nn.Module) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=denoiser,
            scheduler=type(self.noise_scheduler).from_config(self.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
