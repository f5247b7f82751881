import pytest
import torch
from diffusers import DDPMScheduler

from lightning_refdpo.timesteps import (
    DiscountedTimestepSampler,
    UniformTimestepSampler,
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
