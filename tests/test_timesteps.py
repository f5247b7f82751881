import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from lightning_refdpo.timesteps import (
    SD15_MAX_INVERSE_SQRT_SNR,
    DiscountedTimestepSampler,
    LogitNormalTimestepSampler,
    UniformTimestepSampler,
    flow_model_timesteps,
    flow_reward_scale_schedule,
    flow_training_sigmas,
    reward_scale_schedule,
)


def sd_alphas_cumprod() -> torch.Tensor:
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return scheduler.alphas_cumprod


def test_reward_scale_endpoints_and_monotone():
    lam = reward_scale_schedule(sd_alphas_cumprod())
    assert lam.shape == (1000,)
    assert lam[0].item() == pytest.approx(1.0)
    assert lam[-1].item() == pytest.approx(2.0)
    assert torch.all(lam[1:] > lam[:-1])


def test_reward_scale_matches_formula_midway():
    abar = sd_alphas_cumprod().double()
    s = torch.sqrt((1 - abar) / abar)
    expected = 1 + (s[500] - s.min()) / (s.max() - s.min())
    assert reward_scale_schedule(sd_alphas_cumprod())[500].item() == pytest.approx(expected.item(), rel=1e-5)


def test_uniform_sampler_range():
    t = UniformTimestepSampler(1000).sample(10_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert abs(t.float().mean().item() - 499.5) < 10


@pytest.mark.parametrize("gamma", [0.9, 0.8])
def test_discounted_sampler_bin_frequencies(gamma):
    """Empirical bin shares match gamma^k / sum_j gamma^j (bin 0 = noisiest) within 5 sigma."""
    sampler = DiscountedTimestepSampler(1000, gamma=gamma, num_bins=50)
    n = 200_000
    t = sampler.sample(n, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999
    bins = (999 - t) // 20  # 50 bins of 20 steps, counted from the noisy end
    counts = torch.bincount(bins, minlength=50).double()
    p = gamma ** torch.arange(50, dtype=torch.float64)
    p /= p.sum()
    sigma = torch.sqrt(n * p * (1 - p))
    assert torch.all((counts - n * p).abs() <= 5 * sigma + 1)
    torch.testing.assert_close(sampler.bin_probabilities, p)


def test_discounted_sampler_uniform_inside_bin():
    sampler = DiscountedTimestepSampler(1000, gamma=0.5, num_bins=10)
    t = sampler.sample(100_000, generator=torch.Generator().manual_seed(1))
    in_first_bin = t[t >= 900]
    counts = torch.bincount(in_first_bin - 900, minlength=100).double()
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()


def test_discounted_sampler_uneven_bins_cover_all_steps():
    sampler = DiscountedTimestepSampler(10, gamma=1.0, num_bins=3)
    t = sampler.sample(5000, generator=torch.Generator().manual_seed(2))
    assert set(t.tolist()) == set(range(10))


def test_gamma_one_is_uniform():
    t = DiscountedTimestepSampler(1000, gamma=1.0, num_bins=50).sample(
        100_000, generator=torch.Generator().manual_seed(3)
    )
    assert abs(t.float().mean().item() - 499.5) < 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.1}, "gamma"),
        ({"num_bins": 0}, "num_bins"),
        ({"num_bins": 1001}, "num_bins"),
    ],
)
def test_invalid_sampler_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiscountedTimestepSampler(1000, **kwargs)


def test_reward_scale_is_finite_for_zero_terminal_snr():
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
    )
    assert scheduler.alphas_cumprod[-1] == 0
    lam = reward_scale_schedule(scheduler.alphas_cumprod)
    assert torch.isfinite(lam).all() and lam[0].item() == pytest.approx(1.0) and lam[-1].item() == 2.0
    capped = reward_scale_schedule(scheduler.alphas_cumprod, max_inverse_sqrt_snr=14.6)
    assert torch.isfinite(capped).all() and torch.all(capped[1:] >= capped[:-1]) and capped[-1] == 2.0
    assert (capped > 1.5).float().mean() > 0.2, "the clip keeps lambda from being 1 almost everywhere"


def sd3_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_training_sigmas_are_the_schedulers_read_noisiest_last(shift):
    scheduler = sd3_scheduler(shift)
    sigmas = flow_training_sigmas(scheduler)
    assert sigmas.shape == (1000,) and torch.all(sigmas[1:] > sigmas[:-1]) and sigmas[-1] == 1.0
    torch.testing.assert_close(sigmas, scheduler.sigmas.flip(0), rtol=0, atol=0)
    u = np.arange(1, 1001) / 1000
    np.testing.assert_allclose(sigmas.numpy(), shift * u / (1 + (shift - 1) * u), rtol=1e-6)
    timesteps = flow_model_timesteps(sigmas, 1000)
    torch.testing.assert_close(timesteps, scheduler.timesteps.flip(0), rtol=0, atol=0)


def test_flow_training_sigmas_ignore_the_inference_grid_and_take_a_config():
    scheduler = sd3_scheduler()
    expected = flow_training_sigmas(scheduler)
    scheduler.set_timesteps(4)
    torch.testing.assert_close(flow_training_sigmas(scheduler), expected, rtol=0, atol=0)
    config = {"num_train_timesteps": 1000, "shift": 3.0}
    torch.testing.assert_close(flow_training_sigmas(config), expected, rtol=0, atol=0)


def test_sd15_clip_is_the_largest_inverse_sqrt_snr_of_sd15():
    abar = sd_alphas_cumprod().double()
    assert SD15_MAX_INVERSE_SQRT_SNR == pytest.approx(torch.sqrt((1 - abar) / abar).max().item(), rel=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_reward_scale_is_finite_bounded_and_monotone_in_sigma(shift):
    sigmas = flow_training_sigmas(sd3_scheduler(shift))
    lam = flow_reward_scale_schedule(sigmas)
    assert lam.shape == (1000,) and torch.isfinite(lam).all()
    assert lam.min() >= 1.0 and lam.max() <= 2.0
    assert lam[0].item() == pytest.approx(1.0) and lam[-1].item() == 2.0
    assert torch.all(lam[1:] >= lam[:-1]) and torch.any(lam[1:] > lam[:-1])
    assert (lam[: int(0.5 * 1000)] < 2.0).all(), "the clip only reaches the noisy end"


def test_flow_reward_scale_matches_the_formula():
    """lambda = 1 + (min(s, c) - s_0) / (c - s_0), s = sigma / (1 - sigma), c = SD1.5's largest
    1/sqrt(SNR), written here in numpy from the formulas."""
    u = np.arange(1, 1001, dtype=np.float64) / 1000
    sigma = 3.0 * u / (1 + 2.0 * u)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    abar = np.cumprod(1 - betas)
    cap = np.sqrt((1 - abar[-1]) / abar[-1])
    with np.errstate(divide="ignore"):
        s = np.minimum(sigma / (1 - sigma), cap)
    expected = 1 + (s - s.min()) / (cap - s.min())
    lam = flow_reward_scale_schedule(flow_training_sigmas(sd3_scheduler()).double())
    np.testing.assert_allclose(lam.numpy(), expected, rtol=1e-5)


def test_flow_and_ddpm_reward_scales_are_one_function_of_snr():
    """SD3's lambda at each sigma is SD1.5's lambda at the same 1/sqrt(SNR) (linear in it, so
    interpolated exactly over SD1.5's t), up to the schedules' smallest 1/sqrt(SNR) (0.003, 0.029)."""
    abar = sd_alphas_cumprod().double()
    s15 = torch.sqrt((1 - abar) / abar)
    sigmas = flow_training_sigmas(sd3_scheduler()).double()
    s = (sigmas / (1 - sigmas)).clamp(max=s15.max().item())
    expected = np.interp(s.numpy(), s15.numpy(), reward_scale_schedule(abar).numpy())
    np.testing.assert_allclose(flow_reward_scale_schedule(sigmas).numpy(), expected, rtol=0, atol=0.003)


def test_flow_reward_scale_with_the_largest_finite_clip_is_nearly_flat():
    """The alternative clip (largest finite 1/sqrt(SNR), s = 2997 at t = 998) leaves lambda ~ 1:
    why the SD1.5 clip is the default."""
    lam = flow_reward_scale_schedule(flow_training_sigmas(sd3_scheduler()), max_inverse_sqrt_snr=None)
    assert torch.isfinite(lam).all() and lam[-1] == 2.0
    assert (lam < 1.1).float().mean() > 0.98


def logit_normal_cdf(x: float, mean: float, std: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    return 0.5 * (1 + math.erf((math.log(x / (1 - x)) - mean) / (std * math.sqrt(2))))


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal_sampler_matches_its_cdf(mean, std):
    """Kolmogorov-Smirnov distance to P(t <= k) = Phi((logit((k + 1) / T) - mean) / std) below the
    1% critical value 1.63 / sqrt(n)."""
    n = 50_000
    t = LogitNormalTimestepSampler(1000, mean=mean, std=std).sample(n, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    empirical = np.cumsum(np.bincount(t.numpy(), minlength=1000)) / n
    analytic = np.array([logit_normal_cdf((k + 1) / 1000, mean, std) for k in range(1000)])
    assert np.abs(empirical - analytic).max() < 1.63 / math.sqrt(n)


def test_logit_normal_sampler_direction_and_seed():
    """A positive mean pushes t, hence sigma_t, towards the noise; the generator fixes the draw."""
    sampler = LogitNormalTimestepSampler(1000, mean=1.0)
    t = sampler.sample(10_000, torch.Generator().manual_seed(0))
    sigmas = flow_training_sigmas(sd3_scheduler(1.0))
    assert sigmas[t].mean() > 0.65 and (t > 500).float().mean() > 0.8
    torch.testing.assert_close(t, sampler.sample(10_000, torch.Generator().manual_seed(0)))
    assert not torch.equal(t, sampler.sample(10_000, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="std"):
        LogitNormalTimestepSampler(1000, std=0.0)
