"""Timestep-aware optimization (arXiv 2505.18736, Sec. 4.2; see docs/METHOD.md).

Two pieces: the training-timestep samplers (uniform, as in Diffusion-DPO, and the discounted
sampler that oversamples the noisy early denoising steps) and the reward scale ``lambda(t)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


def inverse_sqrt_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``s(t) = 1 / sqrt(SNR(t)) = sqrt((1 - abar_t) / abar_t)`` in float64 (infinite where
    ``abar_t = 0``)."""
    abar = alphas_cumprod.double()
    return torch.sqrt((1.0 - abar) / abar)


def reward_scale_schedule(
    alphas_cumprod: torch.Tensor, max_inverse_sqrt_snr: float | None = None
) -> torch.Tensor:
    """``lambda(t) = 1 + norm(s(t))`` with ``s(t) = 1 / sqrt(SNR(t)) = sqrt((1 - abar_t) / abar_t)``.

    ``norm`` is the min-max normalisation over ``t = 0 .. T-1``, so ``lambda`` rises from 1 at the
    cleanest step to 2 at the noisiest (arXiv 2505.18736, Sec. 4.2). ``alphas_cumprod`` is the scheduler's
    ``abar_t`` for every training timestep, shape ``(T,)``.

    Zero terminal SNR (``abar_{T-1} = 0``, diffusers' ``rescale_betas_zero_snr``) makes ``s`` infinite
    there, and the plain formula gives ``lambda(T-1) = NaN`` and ``lambda = 1`` everywhere else.
    ``s`` is therefore clipped at ``max_inverse_sqrt_snr`` (``DiffusionDPOModule`` passes the largest
    ``s`` of the same scheduler without the rescaling) or, without it, at its largest finite value,
    so ``lambda`` is finite and equals 2 on the steps at or beyond the clip.
    """
    s = inverse_sqrt_snr(alphas_cumprod)
    cap = max_inverse_sqrt_snr if max_inverse_sqrt_snr is not None else s[torch.isfinite(s)].max()
    s = s.clamp(max=cap)
    lo, hi = s.min(), s.max()
    if hi <= lo:
        raise ValueError("alphas_cumprod must vary over t to define a reward scale schedule")
    return (1.0 + (s - lo) / (hi - lo)).to(alphas_cumprod.dtype)


class TimestepSampler(ABC):
    """Draws the training timestep of each preference pair (one ``t`` per pair, shared by winner
    and loser)."""

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1; got {num_train_timesteps}")
        self.num_train_timesteps = num_train_timesteps

    @abstractmethod
    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A ``LongTensor`` of ``batch_size`` timesteps in ``[0, num_train_timesteps)``."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class UniformTimestepSampler(TimestepSampler):
    """``t ~ U{0, ..., T-1}``, the sampler of Diffusion-DPO."""

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator)


class DiscountedTimestepSampler(TimestepSampler):
    """Oversamples the early (high-noise) denoising steps (arXiv 2505.18736, Sec. 4.2).

    The ``T`` timesteps are split into ``num_bins`` equal intervals, bin 0 holding the noisiest
    (``t`` near ``T-1``). Bin ``k`` is drawn with probability ``gamma^k / sum_j gamma^j``, then ``t``
    uniformly inside it; no importance re-weighting. ``gamma = 0.9`` is the paper's default.
    ``num_bins = 50`` (one bin per step of a 50-step sampler, as in the dense-reward work the paper
    borrows the discount from) is our choice where the paper's appendix would decide. When ``T`` is
    not a multiple of ``num_bins``, bin edges are ``floor(k T / num_bins)``, so bin sizes differ by
    at most one.
    """

    def __init__(self, num_train_timesteps: int = 1000, gamma: float = 0.9, num_bins: int = 50) -> None:
        super().__init__(num_train_timesteps)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1] (1 = uniform over bins); got {gamma}")
        if not 1 <= num_bins <= num_train_timesteps:
            raise ValueError(
                f"num_bins must be between 1 and num_train_timesteps ({num_train_timesteps}); got {num_bins}"
            )
        self.gamma = gamma
        self.num_bins = num_bins
        self._bin_probs = gamma ** torch.arange(num_bins, dtype=torch.float64)
        self._bin_probs /= self._bin_probs.sum()
        edges = torch.arange(num_bins + 1, dtype=torch.long) * num_train_timesteps // num_bins
        # Bin k counted from the noisy end covers t in [T - edges[k+1], T - edges[k]).
        self._bin_low = num_train_timesteps - edges[1:]
        self._bin_size = edges[1:] - edges[:-1]

    @property
    def bin_probabilities(self) -> torch.Tensor:
        """``P(bin k) = gamma^k / sum_j gamma^j``, bin 0 the noisiest."""
        return self._bin_probs.clone()

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        bins = torch.multinomial(self._bin_probs, batch_size, replacement=True, generator=generator)
        offsets = torch.rand(batch_size, generator=generator, dtype=torch.float64) * self._bin_size[bins]
        return self._bin_low[bins] + offsets.long()
