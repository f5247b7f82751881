"""One backbone per model family: how its batches become latents, conditioning and targets."""

from lightning_refdpo.backbones.base import Backbone
from lightning_refdpo.backbones.sd3 import StableDiffusion3Backbone
from lightning_refdpo.backbones.sd15 import StableDiffusionBackbone
from lightning_refdpo.backbones.sdxl import StableDiffusionXLBackbone

__all__ = ["Backbone", "StableDiffusion3Backbone", "StableDiffusionBackbone", "StableDiffusionXLBackbone"]
