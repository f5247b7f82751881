"""``Backbone``: what the DPO step needs to know about one model family.

A backbone holds the frozen parts of a pipeline (VAE, text encoders, tokenizers, noise scheduler)
and knows how to turn a :class:`~lightning_refdpo.batch.PreferenceBatch` into latents and
conditioning, how the forward process noises them, what the denoiser is trained to predict and
how it is called. The denoiser itself (UNet or transformer) belongs to the module, which trains it
and hands it to :meth:`Backbone.predict`. A new model family is a new subclass; the DPO step,
the reference strategies and the callbacks do not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from lightning_refdpo.batch import PreferenceBatch
from lightning_refdpo.data.draws import LATENT_STREAM, pair_normal
from lightning_refdpo.hub import load_component

Conditioning = dict[str, torch.Tensor]
LOSER = "loser_"
"""Prefix of a conditioning entry that holds the losers' own value where it differs from the
winners' (SDXL's per-image ``time_ids``; the prompts of unpaired couples)."""


class Backbone(torch.nn.Module, ABC):
    """The frozen components of a diffusers pipeline and the diffusion process of its family.

    Args:
        pretrained_model_name_or_path: hub id or local folder in the diffusers layout of the family.
        revision, variant: passed to every ``from_pretrained``.
        vae_name_or_path: a VAE (hub id or folder holding an ``AutoencoderKL``) instead of the
            pipeline's ``vae`` subfolder.
    """

    denoiser_name: ClassVar[str] = "unet"
    """The denoiser's subfolder and component name in the pipeline (``unet`` or ``transformer``)."""
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        revision: str | None = None,
        variant: str | None = None,
        vae_name_or_path: str | None = None,
    ) -> None:
        super().__init__()
        self.pretrained_model_name_or_path = pretrained_model_name_or_path
        self.revision, self.variant = revision, variant
        self.vae_name_or_path = vae_name_or_path
        self.load_components()
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ loading
    def load(self, cls: Any, subfolder: str, weights: bool = True) -> Any:
        """``cls.from_pretrained`` of a subfolder of the model, with its revision (and variant for
        weights)."""
        kwargs = {"revision": self.revision, **({"variant": self.variant} if weights else {})}
        return load_component(cls, self.pretrained_model_name_or_path, subfolder, **kwargs)

    def load_vae(self, cls: Any) -> Any:
        if self.vae_name_or_path:
            return load_component(cls, self.vae_name_or_path)
        return self.load(cls, "vae")

    @abstractmethod
    def load_components(self) -> None:
        """Load the frozen components (``vae``, text encoders, tokenizers, ``noise_scheduler``)."""

    @abstractmethod
    def load_denoiser(self) -> torch.nn.Module:
        """A fresh copy of the pretrained denoiser (the policy starts from it)."""

    def configure_denoiser(self, denoiser: torch.nn.Module, attention: str) -> None:
        """Set the attention processor of ``denoiser``: ``sdpa``, ``xformers`` or ``eager``."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        if attention == "xformers":
            denoiser.enable_xformers_memory_efficient_attention()
        else:
            denoiser.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())

    # ------------------------------------------------------------------ encoding
    @property
    def device(self) -> torch.device:
        return self.vae.device

    @torch.no_grad()
    def latent_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior ``q(z | x)`` of images in ``[-1, 1]`` (what the latent
        cache stores)."""
        dist = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents on the scale the denoiser was trained on: ``z * scaling_factor``."""
        return latents * self.vae.config.scaling_factor

    def sample_latents(
        self, mean: torch.Tensor, std: torch.Tensor, noise_seeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``scale_latents(mean + std * eps)``, the draw of ``latent_dist.sample()``, shared by cached
        and uncached training so both consume the RNG alike. ``mean`` holds the winners, then the
        losers; with ``noise_seeds`` (training) pair ``i`` draws its winner's and loser's ``eps``
        from its own seed (``data/draws.py``), else ``eps`` comes from the global RNG."""
        if noise_seeds is None:
            # randn_like would copy the strides of the VAE's non-contiguous ``mean`` view and place
            # the same draws differently from a cached (contiguous) mean.
            eps = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
        else:
            eps = pair_normal(noise_seeds, LATENT_STREAM, (2, *mean.shape[1:])).transpose(0, 1)
            eps = eps.reshape(mean.shape).to(mean)
        return self.scale_latents(mean + std * eps)

    @abstractmethod
    def encode_prompts(self, captions: Sequence[str]) -> Conditioning:
        """The denoiser's text conditioning for ``captions`` (one row each); every entry is also a
        column of the latent cache."""

    def token_ids(
        self, tokenizer: Any, captions: Sequence[str], max_length: int | None = None
    ) -> torch.Tensor:
        """``captions`` tokenized, padded and truncated to ``max_length`` (default: the tokenizer's
        ``model_max_length``)."""
        return tokenizer(
            list(captions),
            padding="max_length",
            max_length=max_length or tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def encode_batch(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """Winner latents, loser latents and the per-pair conditioning of a preference batch, from
        pixels and captions, from latents shipped with the pairs (``latents_w``, ``latents_l``: exact,
        no posterior draw) or from a latent cache (``latents_mean_w``, ... and the prompt columns).
        A batch of unpaired couples (``caption_l``) adds the losers' prompts as ``loser_*`` entries."""
        if "latents_mean_w" in batch:
            mean = torch.cat([batch["latents_mean_w"], batch["latents_mean_l"]])
            std = torch.cat([batch["latents_std_w"], batch["latents_std_l"]])
            missing = [k for k in self.prompt_columns() if k not in batch]
            if missing:
                raise KeyError(
                    f"the latent cache has no {', '.join(missing)} column: it was written for another model "
                    "family; rebuild it with lightning-refdpo cache and this model's config"
                )
            cond = {k: batch[k] for k in self.prompt_columns()}
        elif "latents_w" in batch:
            mean = torch.cat([batch["latents_w"], batch["latents_l"]]).to(self.device)
            std = torch.zeros_like(mean)
            cond = self.encode_prompts(batch["caption"])
        else:
            pixels = batch["pixel_values"]
            mean, std = self.latent_distribution(torch.cat([pixels[:, :3], pixels[:, 3:]]))
            cond = self.encode_prompts(batch["caption"])
        if "caption_l" in batch:
            cond |= {LOSER + k: v for k, v in self.encode_prompts(batch["caption_l"]).items()}
        latents_w, latents_l = self.sample_latents(mean, std, batch.get("noise_seeds")).chunk(2)
        return latents_w, latents_l, cond

    def prompt_columns(self) -> tuple[str, ...]:
        """The keys of :meth:`encode_prompts`, as stored in a latent cache."""
        return ("encoder_hidden_states",)

    def pair_conditioning(self, cond: Conditioning) -> Conditioning:
        """The conditioning of the batched forward over winners then losers, from the per-pair
        ``cond`` of :meth:`encode_batch`: each pair's conditioning for both of its images, or the
        loser's own where ``cond`` has a ``loser_*`` entry."""
        return {k: torch.cat([v, cond.get(LOSER + k, v)]) for k, v in cond.items() if not k.startswith(LOSER)}

    # ------------------------------------------------------------------ diffusion
    @property
    def num_train_timesteps(self) -> int:
        """``T``: training timesteps are integers in ``[0, T)``, larger is noisier."""
        return self.noise_scheduler.config.num_train_timesteps

    @abstractmethod
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t`` of the forward process at integer ``timesteps``."""

    @abstractmethod
    def diffusion_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the denoiser is trained to predict from ``x_t``."""

    @abstractmethod
    def reward_scale_schedule(self) -> torch.Tensor:
        """``lambda(t)`` of arXiv 2505.18736 (Sec. 4.2) for every training timestep, shape ``(T,)``."""

    def denoiser_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timestep values the denoiser takes for integer ``timesteps``."""
        return timesteps

    def denoiser_kwargs(self, cond: Conditioning, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of the denoiser's forward for the conditioning ``cond``, in ``dtype``
        (the losers' own ``loser_*`` entries are not arguments: :meth:`pair_conditioning` merges them)."""
        return {
            k: v.to(dtype) if torch.is_floating_point(v) else v
            for k, v in cond.items()
            if not k.startswith(LOSER)
        }

    def predict(
        self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The prediction of ``denoiser`` (policy, reference or initial model) at ``x_t``, in the
        denoiser's dtype."""
        dtype = next(denoiser.parameters()).dtype
        kwargs = self.denoiser_kwargs(cond, dtype)
        out = denoiser(noisy.to(dtype), timestep=self.denoiser_timesteps(timesteps), **kwargs)
        return out.sample

    # ------------------------------------------------------------------ generation and export
    @abstractmethod
    def build_pipeline(self, denoiser: torch.nn.Module) -> Any:
        """A diffusers pipeline over these components and ``denoiser``, without safety checker or
        watermark, with a copy of the training scheduler."""

    def lora_layers(self, peft_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A peft LoRA state dict of the denoiser in the layout the pipeline's ``load_lora_weights``
        reads: for UNets the diffusers layout, as diffusers' LoRA training scripts save it."""
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(peft_state_dict)

    def base_scheduler(self) -> Any:
        """The base model's own sampler (e.g. ``EulerDiscreteScheduler`` for SDXL), not the training
        scheduler."""
        import diffusers

        config = diffusers.DDPMScheduler.load_config(
            self.pretrained_model_name_or_path, subfolder="scheduler", revision=self.revision
        )
        return getattr(diffusers, config["_class_name"]).from_config(config)
