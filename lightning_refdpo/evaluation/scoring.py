"""Reward scores of generated images, win rates and their bootstrap confidence intervals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lightning_refdpo.metrics import RewardScore, to_float_images, win_outcomes, win_rate


def paper_scorers() -> list[RewardScore]:
    """The five reward models of the paper's tables, as Diffusion-DPO computes them: PickScore,
    HPSv2 v2.0, CLIP score of open_clip ViT-H-14 (laion2B-s32B-b79K), LAION aesthetic, ImageReward."""
    from lightning_refdpo.metrics import AestheticScore, HPSv2, ImageReward, OpenCLIPScore, PickScore

    return [PickScore(), HPSv2(version="v2.0"), OpenCLIPScore(), AestheticScore(), ImageReward()]


def score(
    scorers: dict[str, RewardScore], images: torch.Tensor, prompts: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Per-image scores of every scorer (reset first; gathered across ranks under DDP)."""
    results = {}
    for name, scorer in scorers.items():
        scorer.reset()
        scorer.update(images, list(prompts))
        with scorer.sync_context():
            results[name] = scorer.scores().cpu()
    return results


@torch.no_grad()
def score_batch(
    scorers: dict[str, RewardScore], images: torch.Tensor, prompts: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Per-image scores of every scorer for one batch, on this process only (no metric state kept)."""
    return {
        name: scorer.score(to_float_images(images).to(scorer.device), list(prompts)).float().cpu()
        for name, scorer in scorers.items()
    }


def compare(
    scores: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Mean of model and baseline and the model's win rate, per scorer."""
    return {
        name: {
            "model_mean": float(scores[name].mean()),
            "baseline_mean": float(baseline[name].mean()),
            "win_rate": win_rate(scores[name], baseline[name]),
        }
        for name in scores
    }


def bootstrap_intervals(
    scores: np.ndarray,
    baseline: np.ndarray,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of the model mean, the baseline mean and the win rate.

    Each resample draws ``n`` items with replacement (paired: an item's model and baseline scores
    stay together) and the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
    quantiles of the statistic over ``num_resamples`` resamples (seeded, so reproducible).
    """
    rng = np.random.default_rng(seed)
    wins = win_outcomes(scores, baseline)
    statistics = {"model_ci": scores, "baseline_ci": baseline, "win_rate_ci": wins}
    draws = {key: [] for key in statistics}
    for start in range(0, num_resamples, 100):
        index = rng.integers(0, len(scores), (min(100, num_resamples - start), len(scores)))
        for key, values in statistics.items():
            draws[key].append(values[index].mean(axis=1))
    quantiles = [(1 - confidence) / 2, (1 + confidence) / 2]
    return {key: np.quantile(np.concatenate(d), quantiles).tolist() for key, d in draws.items()}
