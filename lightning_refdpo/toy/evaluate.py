"""Measuring toy models: ToyReward and its parts per image, attribute summaries, and win rates with
bootstrap confidence intervals over prompts and seeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lightning_refdpo.evaluation import GenerationConfig, generate
from lightning_refdpo.toy.reward import ToyReward

ATTRIBUTES = ("size", "colour", "shape", "position", "clean", "background")
GENERATION = {"num_inference_steps": 25, "guidance_scale": 7.5, "batch_size": 64}
"""The toy evaluation sampler: DDIM 25 steps at guidance 7.5, where the base model scores best on the
validation prompts together with 9 (0.702 and 0.704; 6 gives 0.688, 12 gives 0.668:
``scripts/toy/measure_base.py``, ``benchmarks/results/toy_base.json``); 7.5 is also SD1.5's own."""
CORRECT = 0.5
"""An attribute counts as followed in an image when its ToyReward part is at least this."""


@torch.no_grad()
def toy_scores(
    pipeline: Any, items: Sequence[tuple[str, int]], config: GenerationConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images ``(N, 3, H, W)`` of the (prompt, seed) items and every ToyReward part ``(N,)``
    (``score`` is the reward itself)."""
    images = generate(pipeline, items, config)
    return images, ToyReward().parts(images, [p for p, _ in items])


def attribute_summary(parts: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per attribute: the mean of its ToyReward part and the share of images that follow it
    (part >= ``CORRECT``)."""
    return {
        name: {"mean": float(parts[name].mean()), "correct": float((parts[name] >= CORRECT).float().mean())}
        for name in ATTRIBUTES
    }


def bootstrap_ci(
    outcomes: torch.Tensor, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``outcomes.mean()`` for ``outcomes`` of shape
    ``(training seeds, prompts, evaluation seeds)``: each resample draws training seeds and prompts
    with replacement (the two sources of variation a rerun on new prompts would see), keeping each
    prompt's evaluation seeds together."""
    values = outcomes.double().mean(-1).numpy()  # (seeds, prompts)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(values.shape[0], size=(resamples, values.shape[0]))
    prompts = rng.integers(values.shape[1], size=(resamples, values.shape[1]))
    means = values[seeds[:, :, None], prompts[:, None, :]].mean(axis=(1, 2))
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def gain_in_std(scores: torch.Tensor, baseline: torch.Tensor) -> float:
    """The mean gain over the standard deviation of the per-evaluation-seed gains: ``scores`` and
    ``baseline`` are ``(prompts, evaluation seeds)``; the gain of seed ``s`` is the mean over prompts."""
    per_seed = (scores - baseline).double().mean(0)
    spread = float(per_seed.std()) if per_seed.numel() > 1 else float("nan")
    return float(per_seed.mean()) / spread if spread > 0 else float("inf")
