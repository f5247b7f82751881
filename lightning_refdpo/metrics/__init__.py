"""Reward scorers as torchmetrics ``Metric`` objects, one file each."""

from lightning_refdpo.metrics.aesthetic import AestheticScore
from lightning_refdpo.metrics.base import RewardScore, to_float_images, to_pil_images
from lightning_refdpo.metrics.clip_score import CLIPScore
from lightning_refdpo.metrics.hpsv2 import HPSv2
from lightning_refdpo.metrics.image_reward import ImageReward
from lightning_refdpo.metrics.open_clip_score import OpenCLIPScore
from lightning_refdpo.metrics.pickscore import PickScore
from lightning_refdpo.metrics.win_rate import WinRate, win_outcomes, win_rate

__all__ = [
    "AestheticScore",
    "CLIPScore",
    "HPSv2",
    "ImageReward",
    "OpenCLIPScore",
    "PickScore",
    "RewardScore",
    "WinRate",
    "to_float_images",
    "to_pil_images",
    "win_outcomes",
    "win_rate",
]
