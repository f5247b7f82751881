"""lightning_refdpo: Diffusion-DPO with reference-model updates and timestep-aware optimization
(Kang et al., "Rethinking Direct Preference Optimization in Diffusion Models", arXiv 2505.18736)."""

from lightning_refdpo.callbacks import ReferenceModelUpdate
from lightning_refdpo.data import PreferenceDataModule
from lightning_refdpo.losses import implicit_reward_margin, preference_loss
from lightning_refdpo.module import DiffusionDPOModule
from lightning_refdpo.sd3 import StableDiffusion3DPOModule
from lightning_refdpo.sdxl import StableDiffusionXLDPOModule
from lightning_refdpo.sources import pipeline_from_export
from lightning_refdpo.timesteps import (
    DiscountedTimestepSampler,
    LogitNormalTimestepSampler,
    TimestepSampler,
    UniformTimestepSampler,
    reward_scale_schedule,
)

__all__ = [
    "DiffusionDPOModule",
    "DiscountedTimestepSampler",
    "LogitNormalTimestepSampler",
    "PreferenceDataModule",
    "ReferenceModelUpdate",
    "StableDiffusion3DPOModule",
    "StableDiffusionXLDPOModule",
    "TimestepSampler",
    "UniformTimestepSampler",
    "implicit_reward_margin",
    "pipeline_from_export",
    "preference_loss",
    "reward_scale_schedule",
]
