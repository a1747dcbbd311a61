"""Formula tests for ldm_scratch/diffusion.py: the schedule, q(x_t|x_0), the posterior, conversions, σ ↔ t, loss, CFG."""

import numpy as np
import pytest
import torch

from ldm_scratch.diffusion import Schedule, classifier_free_guidance, eps_loss, posterior_coefficients


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def schedule():
    return Schedule()


def test_scaled_linear_betas_in_float64(schedule):
    # an independent float64 computation with numpy: β = linspace(√β_1, √β_T, T)², ᾱ = cumulative product of 1 − β
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    assert schedule.betas.dtype == torch.float64
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-14)
    np.testing.assert_allclose(schedule.alpha_bar.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    np.testing.assert_allclose(schedule.sigmas.numpy(), np.sqrt((1 - np.cumprod(1 - betas)) / np.cumprod(1 - betas)))
    assert schedule.betas[0].item() == pytest.approx(0.00085) and schedule.betas[-1].item() == pytest.approx(0.012)


def test_q_sample_empirical_mean_and_variance(schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64).expand(20000, -1, -1, -1)
    for t in (0, 250, 999):
        x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        mean, var = schedule.q_mean_variance(x0[:1], t)
        # 20000 samples: standard error of a mean ≤ 1/√20000 ≈ 0.007, of a variance ≈ √(2/20000) ≈ 0.01 (relative)
        assert (x_t.mean(0) - mean[0]).abs().max() < 5 * (var.item() / 20000) ** 0.5
        assert (x_t.var(0) / var.item() - 1).abs().max() < 5 * (2 / 20000) ** 0.5


def test_q_sample_follows_the_equation_not_the_seed_listing(schedule):
    """The seed's `diffuse` writes √(1−ᾱ) x0 + √ᾱ ε; eq 4.1 says √ᾱ x0 + √(1−ᾱ) ε. At t = 999 (ᾱ ≈ 0.005) the
    listing would return an almost clean image at the noisiest step; ours returns almost pure noise."""
    x0, eps = torch.ones(1, 1, 2, 2, dtype=torch.float64), torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    alpha_bar = schedule.alpha_bar[999].item()
    x_t = schedule.q_sample(x0, 999, eps)
    assert torch.allclose(x_t, torch.full_like(x0, alpha_bar**0.5))  # eq 4.1
    assert not torch.allclose(x_t, torch.full_like(x0, (1 - alpha_bar) ** 0.5))  # the listing's swap
    assert x_t.max() < 0.1


@pytest.mark.parametrize("t, t_prev", [(10, None), (500, None), (999, None), (981, 961), (21, 1), (1, -1)])
def test_posterior_matches_bayes_by_regression(schedule, t, t_prev):
    """Draw x_s ~ q(x_s|x_0) and then x_t ~ q(x_t|x_s) (forward steps only); regressing x_s on x_t recovers the
    posterior q(x_s | x_t, x_0): slope c_t, intercept c₀ x_0 and residual variance β̃."""
    g = torch.Generator().manual_seed(1)
    n, x0 = 200_000, 0.7
    s = t - 1 if t_prev is None else t_prev
    ab_t = schedule.alpha_bar[t].item()
    ab_s = schedule.alpha_bar[s].item() if s >= 0 else 1.0
    x_s = ab_s**0.5 * x0 + (1 - ab_s) ** 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    x_t = (ab_t / ab_s) ** 0.5 * x_s + (1 - ab_t / ab_s) ** 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    cov = torch.cov(torch.stack([x_t, x_s]))
    slope = (cov[0, 1] / cov[0, 0]).item()
    intercept = (x_s.mean() - slope * x_t.mean()).item()
    residual = (x_s - slope * x_t - intercept).var().item()
    coef_x0, coef_xt, variance = posterior_coefficients(ab_t, ab_s)
    assert slope == pytest.approx(coef_xt, abs=0.01)
    assert intercept == pytest.approx(coef_x0 * x0, abs=0.01)
    assert residual == pytest.approx(variance, rel=0.02, abs=1e-12)
    # and the tensor API gives the same numbers
    mean, var = schedule.posterior(torch.full((1, 1, 1, 1), x0, dtype=torch.float64),
                                   torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), t, t_prev)
    assert mean.item() == pytest.approx(coef_x0 * x0 + coef_xt * 0.3)
    assert var.item() == pytest.approx(variance)


def test_eps_x0_v_round_trips(schedule):
    g = torch.Generator().manual_seed(2)
    x0, eps = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 500, 999])  # one timestep per sample
    x_t = schedule.q_sample(x0, t, eps)
    torch.testing.assert_close(schedule.eps_to_x0(x_t, t, eps), x0)
    torch.testing.assert_close(schedule.x0_to_eps(x_t, t, x0), eps)
    v = schedule.v_from_x0_eps(x0, t, eps)
    torch.testing.assert_close(schedule.v_to_x0(x_t, t, v), x0)
    torch.testing.assert_close(schedule.v_to_eps(x_t, t, v), eps)


def test_sigma_t_round_trips(schedule):
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.sigmas), t)  # integer t: exact
    torch.testing.assert_close(schedule.t_to_sigma(t, "log"), schedule.sigmas)
    torch.testing.assert_close(schedule.t_to_sigma(t, "linear"), schedule.sigmas)
    sigma = torch.logspace(np.log10(0.03), np.log10(14.6), 500, dtype=torch.float64)  # continuous σ: log interp
    torch.testing.assert_close(schedule.t_to_sigma(schedule.sigma_to_t(sigma)), sigma)
    t_frac = torch.rand(500, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 999
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t_frac)), t_frac)
    # outside the trained range σ clamps to the ends
    assert schedule.sigma_to_t(torch.tensor([1e-4, 100.0])).tolist() == [0.0, 999.0]


def test_eps_loss_and_guidance():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert eps_loss(a, a).item() == 0.0
    assert eps_loss(a, b).item() == pytest.approx(((a - b) ** 2).sum().item() / a.numel(), rel=1e-6)
    torch.testing.assert_close(classifier_free_guidance(a, b, 1.0), b)  # s = 1: the conditional prediction
    torch.testing.assert_close(classifier_free_guidance(a, b, 0.0), a)  # s = 0: the unconditional one
    torch.testing.assert_close(classifier_free_guidance(a, b, 7.5), -6.5 * a + 7.5 * b)  # ε∅ + s(εc − ε∅)


def test_bad_timesteps_are_rejected(schedule):
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="out of range"):
        schedule.q_sample(x, 1000, x)
    with pytest.raises(ValueError, match="fractional"):
        schedule.q_sample(x, torch.tensor(3.5), x)
    with pytest.raises(ValueError, match="out of range"):
        schedule.t_to_sigma(-1.0)


@pytest.mark.parity
def test_schedule_matches_diffusers(schedule):
    diffusers = pytest.importorskip("diffusers", reason="needs the [reference] extra")
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    # diffusers builds β in float32, so agreement is float32-deep: measured max relative difference 2.2e-7 (β) and
    # 9.3e-7 (ᾱ, a product of 1000 float32 factors); 5e-6 allows for other float32 rounding orders, no more
    torch.testing.assert_close(ref.betas.double(), schedule.betas, rtol=5e-6, atol=0)
    torch.testing.assert_close(ref.alphas_cumprod.double(), schedule.alpha_bar, rtol=5e-6, atol=0)
