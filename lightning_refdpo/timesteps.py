"""Timestep-aware optimization (arXiv 2505.18736, Sec. 4.2; see docs/METHOD.md).

Two pieces: the training-timestep samplers (uniform, as in Diffusion-DPO, the discounted sampler
that oversamples the noisy early denoising steps, and SD3's logit-normal density) and the reward
scale ``lambda(t)``, for DDPM schedules (``abar_t``) and rectified flow (``sigma_t``).

One integer convention for both families: ``t`` in ``[0, T)``, larger = noisier. A DDPM's ``t``
indexes ``alphas_cumprod``; a flow's indexes ``flow_training_sigmas`` (ascending, ``sigma_{T-1} = 1``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler

# ``1 / sqrt(SNR)`` at ``t = 999`` of SD1.5's scaled-linear DDPM schedule (``beta`` from 0.00085 to
# 0.012, ``sqrt((1 - abar_999) / abar_999)``, ``abar`` in diffusers' float32): the default clip of the
# flow reward scale, so both families share one ``lambda`` as a function of the SNR.
SD15_MAX_INVERSE_SQRT_SNR = 14.614646624923662


def inverse_sqrt_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``s(t) = 1 / sqrt(SNR(t)) = sqrt((1 - abar_t) / abar_t)`` in float64 (infinite where
    ``abar_t = 0``)."""
    abar = alphas_cumprod.double()
    return torch.sqrt((1.0 - abar) / abar)


def normalized_reward_scale(
    inverse_sqrt_snrs: torch.Tensor, max_inverse_sqrt_snr: float | None = None
) -> torch.Tensor:
    """``lambda = 1 + (min(s, c) - s_lo) / (c - s_lo)``, the min-max normalisation of arXiv 2505.18736, Sec. 4.2.

    ``s = 1 / sqrt(SNR)`` for every training timestep (shape ``(T,)``, ``+inf`` allowed),
    ``c = max_inverse_sqrt_snr`` or, without it, the largest finite ``s``, and ``s_lo`` the smallest
    clipped ``s``. ``lambda`` is float64, rises from 1 at the cleanest step to 2 and is 2 on every step
    at or beyond the clip, so it stays finite where the SNR reaches 0 (``s = inf``: the zero terminal
    SNR of ``rescale_betas_zero_snr``, ``sigma = 1`` of rectified flow). Shared by the DDPM
    (``reward_scale_schedule``) and flow (``flow_reward_scale_schedule``) schedules.
    """
    s = inverse_sqrt_snrs.double()
    cap = max_inverse_sqrt_snr if max_inverse_sqrt_snr is not None else s[torch.isfinite(s)].max()
    s = s.clamp(max=cap)
    lo, hi = s.min(), s.max()
    if hi <= lo:
        raise ValueError("1/sqrt(SNR) must vary over t (below the clip) to define a reward scale schedule")
    return 1.0 + (s - lo) / (hi - lo)


def reward_scale_schedule(
    alphas_cumprod: torch.Tensor, max_inverse_sqrt_snr: float | None = None
) -> torch.Tensor:
    """``lambda(t) = 1 + norm(s(t))`` with ``s(t) = 1 / sqrt(SNR(t)) = sqrt((1 - abar_t) / abar_t)``.

    ``norm`` is ``normalized_reward_scale``, the min-max normalisation over ``t = 0 .. T-1``, so
    ``lambda`` rises from 1 at the cleanest step to 2 at the noisiest (arXiv 2505.18736, Sec. 4.2).
    ``alphas_cumprod`` is the scheduler's ``abar_t`` for every training timestep, shape ``(T,)``.

    Zero terminal SNR (``abar_{T-1} = 0``, diffusers' ``rescale_betas_zero_snr``) makes ``s`` infinite
    there, and the plain formula gives ``lambda(T-1) = NaN`` and ``lambda = 1`` everywhere else.
    ``s`` is therefore clipped at ``max_inverse_sqrt_snr`` (``StableDiffusionBackbone`` passes the largest
    ``s`` of the same scheduler without the rescaling) or, without it, at its largest finite value,
    so ``lambda`` is finite and equals 2 on the steps at or beyond the clip.
    """
    scales = normalized_reward_scale(inverse_sqrt_snr(alphas_cumprod), max_inverse_sqrt_snr)
    return scales.to(alphas_cumprod.dtype)


def flow_training_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler | Mapping[str, Any],
) -> torch.Tensor:
    """The training noise level ``sigma_t`` of every integer timestep ``t = 0 .. T-1``, ascending.

    Rectified flow (SD3: Esser et al. 2024, arXiv 2403.03206) interpolates
    ``x_t = (1 - sigma_t) x_0 + sigma_t eps``. diffusers' ``FlowMatchEulerDiscreteScheduler`` builds
    ``sigmas = shift u / (1 + (shift - 1) u)`` for ``u = T/T, (T-1)/T, .., 1/T`` (descending, before
    any ``set_timesteps``), and its training scripts index them. Our convention (larger ``t`` =
    noisier) reads them backwards: ``sigma_t = shift u_t / (1 + (shift - 1) u_t)`` with
    ``u_t = (t + 1) / T``, so ``sigma_{T-1} = 1`` (pure noise) and ``sigma_0 = shift / (T + shift - 1)``.

    ``scheduler`` is a ``FlowMatchEulerDiscreteScheduler`` or its config (a mapping, e.g.
    ``{"num_train_timesteps": 1000, "shift": 3.0}``). The sigmas come from a scheduler freshly built
    from that config, as a pipeline's ``set_timesteps`` replaces ``scheduler.sigmas`` with the
    inference grid. With ``use_dynamic_shifting`` (Flux) diffusers leaves them unshifted
    (``shift`` applies per resolution at inference), and so does this. Returns float32, shape ``(T,)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = getattr(scheduler, "config", scheduler)
    return FlowMatchEulerDiscreteScheduler.from_config(config).sigmas.flip(0)


def flow_model_timesteps(sigmas: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The timestep the SD3 transformer is called with: ``sigma * T`` (a float in ``(0, T]``).

    This is ``scheduler.timesteps`` (``sigmas * num_train_timesteps`` in
    ``FlowMatchEulerDiscreteScheduler.__init__``), which diffusers' ``train_dreambooth_sd3.py`` feeds
    the transformer as ``timesteps[indices]``, and what ``StableDiffusion3Pipeline`` passes at
    inference.
    """
    return sigmas * num_train_timesteps


def flow_inverse_sqrt_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """``s = 1 / sqrt(SNR) = sigma / (1 - sigma)`` in float64, with ``SNR = ((1 - sigma) / sigma)^2``
    for ``x_t = (1 - sigma) x_0 + sigma eps``; ``+inf`` at ``sigma = 1``."""
    sigmas = sigmas.double()
    return sigmas / (1.0 - sigmas)


def flow_reward_scale_schedule(
    sigmas: torch.Tensor, max_inverse_sqrt_snr: float | None = SD15_MAX_INVERSE_SQRT_SNR
) -> torch.Tensor:
    """``lambda(t) = 1 + norm(sigma_t / (1 - sigma_t))`` for rectified flow (``flow_training_sigmas``).

    ``norm`` is ``normalized_reward_scale`` with the clip ``c = 14.61``, SD1.5's largest
    ``1/sqrt(SNR)`` (``SD15_MAX_INVERSE_SQRT_SNR``, reached at ``sigma = c / (1 + c) = 0.936``).
    ``x_t / (sqrt(abar) + sqrt(1 - abar))`` of a DDPM is the flow ``x_t`` of
    ``sigma = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar))`` at the same SNR, and with this clip
    ``lambda`` is (within 0.002, the two schedules' smallest ``s`` differing) the same function of
    the SNR as SD1.5's: 1.1 at ``sigma = 0.59``, 1.5 at 0.88, 2 from 0.936 on.

    The clip is needed: ``s`` is infinite at ``sigma_{T-1} = 1``, and clipping at the largest finite
    value (``s = 2997`` at ``t = T-2`` for ``T = 1000``, shift 3) leaves ``lambda < 1.1`` on 99% of
    the steps, i.e. plain Diffusion-DPO. Measured with ``T = 1000``, shift 3 (SD3), SD1.5 clip:
    ``E[lambda] = 1.36`` under uniform ``t`` (SD1.5: 1.21), 1.30 under ``LogitNormalTimestepSampler``
    and 1.80 under ``DiscountedTimestepSampler``; ``lambda = 2`` on 17% of the steps (shift 3 puts
    more of them at low SNR than SD1.5, where only ``t = 999`` reaches the clip). Returns the dtype of
    ``sigmas``.
    """
    scales = normalized_reward_scale(flow_inverse_sqrt_snr(sigmas), max_inverse_sqrt_snr)
    return scales.to(sigmas.dtype)


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

    Unchanged for rectified flow under the integer convention above (bin 0 holds ``sigma`` near 1):
    ``FlowMatchEulerDiscreteScheduler.set_timesteps`` spaces its inference steps evenly in the
    unshifted time ``u_t = (t + 1) / T``, so equal bins of ``t`` still hold equally many sampler
    steps; with shift 3, bin 0 of 50 is ``sigma`` in ``[0.994, 1]``.
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


class LogitNormalTimestepSampler(TimestepSampler):
    """SD3's training density: ``u = sigmoid(n)``, ``n ~ N(mean, std^2)``, ``t = min(floor(u T), T-1)``.

    Logit-normal sampling (Esser et al. 2024, arXiv 2403.03206, Sec. 3.1; ``mean = 0``,
    ``std = 1`` is their best ``rf/lognorm(0.00, 1.00)`` and diffusers'
    ``compute_density_for_timestep_sampling("logit_normal")`` default), with
    ``P(t <= k) = Phi((logit((k + 1) / T) - mean) / std)``. ``u`` is the paper's (unshifted) time,
    increasing with the noise: ``t`` indexes ``flow_training_sigmas``, so the training noise is
    ``sigma_t = shift(u_t)``, ``u_t = (t + 1) / T`` within ``1/T`` of ``u``: the paper's
    resolution-dependent timestep shift applied to the sampled time. diffusers' ``train_dreambooth_sd3.py`` indexes the descending
    ``scheduler.timesteps`` with ``floor(u T)`` instead, which draws ``1 - u``: the same distribution
    for ``mean = 0``, the mirrored one (``-mean``) otherwise.
    """

    def __init__(self, num_train_timesteps: int = 1000, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__(num_train_timesteps)
        if std <= 0.0:
            raise ValueError(f"std must be > 0; got {std}")
        self.mean = mean
        self.std = std

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        n = torch.randn(batch_size, generator=generator, dtype=torch.float64)
        u = torch.sigmoid(self.mean + self.std * n)
        return (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
