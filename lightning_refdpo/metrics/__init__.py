"""Reward scorers as torchmetrics ``Metric`` objects, one file each."""

from lightning_refdpo.metrics.base import RewardScore, to_float_images

__all__ = ["RewardScore", "to_float_images"]
