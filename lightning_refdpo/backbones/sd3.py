"""``StableDiffusion3Backbone``: Stable Diffusion 3 / 3.5, a rectified-flow MMDiT.

Training follows diffusers' ``train_dreambooth_sd3.py`` without output preconditioning (the DPO
implementations on SD3.5 do the same):

- latents ``z = (vae(x) - shift_factor) * scaling_factor``;
- ``x_t = (1 - sigma_t) z + sigma_t eps`` with ``sigma_t`` the scheduler's training sigma of the
  integer timestep ``t`` (``timesteps.flow_training_sigmas``: ``t = T-1`` is ``sigma = 1``, pure
  noise), one ``sigma`` and one ``eps`` per pair, shared by winner and loser;
- the target is the velocity ``eps - z``, the transformer is called at ``sigma_t * T``;
- prompts as ``StableDiffusion3Pipeline.encode_prompt``: the penultimate hidden states of both CLIP
  encoders concatenated on the feature axis, zero-padded to the T5 width and followed by the T5
  sequence (zeros without T5); the pooled conditioning is both CLIP projections concatenated.

The reward scale ``lambda(t) = 1 + norm(1/sqrt(SNR))`` with ``SNR = ((1 - sigma) / sigma)^2`` is
``timesteps.flow_reward_scale_schedule``: ``1/sqrt(SNR) = sigma / (1 - sigma)`` is clipped at the
largest value of the SD1.5 schedule, so ``lambda`` is the same function of SNR as for SD1.5/SDXL
(finite, in ``[1, 2]``, increasing in ``sigma``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_refdpo.backbones.base import Backbone, Conditioning
from lightning_refdpo.timesteps import flow_model_timesteps, flow_reward_scale_schedule, flow_training_sigmas


class StableDiffusion3Backbone(Backbone):
    """The ``StableDiffusion3Pipeline`` layout: ``transformer``, ``vae``, ``text_encoder``,
    ``text_encoder_2``, ``text_encoder_3`` (T5) and their tokenizers, ``scheduler``
    (``FlowMatchEulerDiscreteScheduler``).

    Args:
        use_t5: load and use the T5 encoder; ``False`` feeds zeros for its sequence, as SD3 does
            when T5 is dropped (less memory, weaker prompt following).
        max_sequence_length: T5 tokens per prompt (``StableDiffusion3Pipeline``'s default 256, so
            training sees the prompts as generation does).
        **kwargs: those of :class:`~lightning_refdpo.backbones.base.Backbone`.
    """

    denoiser_name = "transformer"
    default_lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    )

    def __init__(
        self, *args: Any, use_t5: bool = True, max_sequence_length: int = 256, **kwargs: Any
    ) -> None:
        if max_sequence_length < 1:
            raise ValueError(f"model.max_sequence_length must be >= 1; got {max_sequence_length}")
        self.use_t5, self.max_sequence_length = use_t5, max_sequence_length
        super().__init__(*args, **kwargs)
        self.register_buffer("sigmas", flow_training_sigmas(self.noise_scheduler), persistent=False)

    def load_components(self) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.noise_scheduler = self.load(FlowMatchEulerDiscreteScheduler, "scheduler", weights=False)
        self.tokenizer = self.load(CLIPTokenizer, "tokenizer", weights=False)
        self.tokenizer_2 = self.load(CLIPTokenizer, "tokenizer_2", weights=False)
        self.text_encoder = self.load(CLIPTextModelWithProjection, "text_encoder")
        self.text_encoder_2 = self.load(CLIPTextModelWithProjection, "text_encoder_2")
        self.tokenizer_3 = self.text_encoder_3 = None
        if self.use_t5:
            self.tokenizer_3 = self.load(T5TokenizerFast, "tokenizer_3", weights=False)
            self.text_encoder_3 = self.load(T5EncoderModel, "text_encoder_3")
        self.vae = self.load_vae(AutoencoderKL)
        self.joint_attention_dim = SD3Transformer2DModel.load_config(
            self.pretrained_model_name_or_path, subfolder="transformer", revision=self.revision
        )["joint_attention_dim"]

    def load_denoiser(self) -> torch.nn.Module:
        from diffusers import SD3Transformer2DModel

        return self.load(SD3Transformer2DModel, "transformer")

    def configure_denoiser(self, denoiser: torch.nn.Module, attention: str) -> None:
        """``sdpa`` keeps the transformer's joint-attention processors (PyTorch SDPA); ``xformers``
        switches them to xformers; there is no eager joint attention in diffusers."""
        if attention == "eager":
            raise ValueError(
                "model.attention: eager is not available for SD3 transformers; use sdpa or xformers"
            )
        if attention == "xformers":
            denoiser.enable_xformers_memory_efficient_attention()

    # ------------------------------------------------------------------ encoding
    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``(z - shift_factor) * scaling_factor``, as SD3 was trained."""
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str]) -> Conditioning:
        """``{"encoder_hidden_states": cat_seq(pad(cat(clip1[-2], clip2[-2])), t5),
        "pooled_projections": cat(pooled1, pooled2)}``, as ``StableDiffusion3Pipeline.encode_prompt``."""
        hidden_states, pooled = [], []
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            out = encoder(self.token_ids(tokenizer, captions), output_hidden_states=True)
            hidden_states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden_states, dim=-1)
        if self.text_encoder_3 is not None:
            t5 = self.text_encoder_3(self.token_ids(self.tokenizer_3, captions, self.max_sequence_length))[0]
        else:
            t5 = clip.new_zeros(len(captions), self.max_sequence_length, self.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }

    def prompt_columns(self) -> tuple[str, ...]:
        return ("encoder_hidden_states", "pooled_projections")

    # ------------------------------------------------------------------ diffusion
    def sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``sigma_t`` of integer ``timesteps``, shaped to broadcast over ``like``."""
        sigma = self.sigmas[timesteps]
        return sigma.reshape(-1, *[1] * (like.ndim - 1)).to(like.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - sigma_t) x_0 + sigma_t eps``."""
        sigma = self.sigma(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def diffusion_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The velocity ``eps - x_0`` (``d x_t / d sigma``)."""
        return noise - latents

    def reward_scale_schedule(self) -> torch.Tensor:
        return flow_reward_scale_schedule(self.sigmas).float()

    def denoiser_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``sigma_t * T``, the timestep SD3's transformer takes (``scheduler.timesteps``)."""
        return flow_model_timesteps(self.sigmas[timesteps], self.num_train_timesteps)

    # ------------------------------------------------------------------ generation
    def lora_layers(self, peft_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The peft layout unchanged, as ``train_dreambooth_lora_sd3.py`` saves it (the SD3 loader
        misreads the converted UNet layout)."""
        return peft_state_dict

    def build_pipeline(self, denoiser: torch.nn.Module) -> Any:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=denoiser,
            scheduler=type(self.noise_scheduler).from_config(self.noise_scheduler.config),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3,
        )
