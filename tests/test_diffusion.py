"""Formula tests for ldm_scratch/diffusion.py: the schedule, q(x_t|x_0), the posterior, conversions, σ ↔ t, loss, CFG."""

import numpy as np
import pytest
import torch

from ldm_scratch.diffusion import (Schedule, alpha_bar_from_sigma, classifier_free_guidance, eps_from_v, eps_from_x0,
                                   eps_from_x0_sigma, eps_loss, posterior_coefficients, sigma_from_alpha_bar,
                                   v_from_x0_eps, x0_from_eps, x0_from_eps_sigma, x0_from_v, xt_from_x0_eps)


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


# -- the conversion functions (written once in diffusion.py, used by Schedule and every sampler) ----------------------

@pytest.fixture(scope="module")
def draws(schedule):
    """x_0, ε `[1000, 4, 8, 8]` float64 and ᾱ_t `[1000, 1, 1, 1]`: one sample at each of the 1000 training timesteps."""
    g = torch.Generator().manual_seed(5)
    x0, eps = (torch.randn(1000, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return x0, eps, schedule.alpha_bar.reshape(1000, 1, 1, 1)


def by_hand(value):
    """For the hand-worked numbers: a few float64 roundings (0.36 and √0.36 are not exact binary fractions)."""
    return pytest.approx(value, rel=1e-14, abs=1e-15)


def test_each_conversion_equation_worked_by_hand():
    """ᾱ = 0.36 gives √ᾱ = 0.6, √(1−ᾱ) = 0.8 and σ = 0.8/0.6 = 4/3, so every equation can be checked with pencil
    numbers. Take x_0 = 1, ε = 2. A swapped coefficient (the seed listing's mistake) changes every line; a round trip
    alone would not catch it if the inverse were swapped too."""
    ab = 0.36
    assert xt_from_x0_eps(1.0, 2.0, ab) == by_hand(2.2)  # x_t = 0.6·1 + 0.8·2
    assert x0_from_eps(2.2, 2.0, ab) == by_hand(1.0)  # x̂₀ = (2.2 − 0.8·2) / 0.6
    assert eps_from_x0(2.2, 1.0, ab) == by_hand(2.0)  # ε = (2.2 − 0.6·1) / 0.8
    assert v_from_x0_eps(1.0, 2.0, ab) == by_hand(0.4)  # v = 0.6·2 − 0.8·1
    assert x0_from_v(2.2, 0.4, ab) == by_hand(1.0)  # x̂₀ = 0.6·2.2 − 0.8·0.4 = 1.32 − 0.32
    assert eps_from_v(2.2, 0.4, ab) == by_hand(2.0)  # ε = 0.8·2.2 + 0.6·0.4 = 1.76 + 0.24
    assert sigma_from_alpha_bar(ab) == by_hand(4 / 3) and alpha_bar_from_sigma(4 / 3) == by_hand(ab)
    # σ-scaling: x_σ = x_t / √ᾱ = 2.2 / 0.6 = 11/3, and x_0 + σ ε = 1 + (4/3)·2 = 11/3 too
    assert x0_from_eps_sigma(11 / 3, 2.0, 4 / 3) == by_hand(1.0)  # x̂₀ = x_σ − σ ε̂
    assert eps_from_x0_sigma(11 / 3, 1.0, 4 / 3) == by_hand(2.0)  # ε = (x_σ − x̂₀) / σ


# Float64 round trips lose only rounding: |x| ≤ ~5 for these draws, × 2.2e-16, × up to 15 where the noisiest level is
# undone (1/√ᾱ_999 ≈ 14.6, σ_999 ≈ 14.6) ≈ 2e-14. Measured worst over all 1000 timesteps: 1.4e-14. Bound 1e-13.
ROUND_TRIP = {"rtol": 0.0, "atol": 1e-13}


def test_conversions_round_trip_at_every_timestep(draws):
    x0, eps, ab = draws
    x_t = xt_from_x0_eps(x0, eps, ab)
    torch.testing.assert_close(x0_from_eps(x_t, eps, ab), x0, **ROUND_TRIP)
    torch.testing.assert_close(eps_from_x0(x_t, x0, ab), eps, **ROUND_TRIP)
    v = v_from_x0_eps(x0, eps, ab)
    torch.testing.assert_close(x0_from_v(x_t, v, ab), x0, **ROUND_TRIP)
    torch.testing.assert_close(eps_from_v(x_t, v, ab), eps, **ROUND_TRIP)
    sigma = sigma_from_alpha_bar(ab)
    torch.testing.assert_close(alpha_bar_from_sigma(sigma), ab, **ROUND_TRIP)
    x_sigma = x_t / ab**0.5  # the σ-scaling of the same point: x_σ = x_t / √ᾱ = x_0 + σ ε
    torch.testing.assert_close(x_sigma, x0 + sigma * eps, **ROUND_TRIP)
    torch.testing.assert_close(x0_from_eps_sigma(x_sigma, eps, sigma), x0, **ROUND_TRIP)
    torch.testing.assert_close(eps_from_x0_sigma(x_sigma, x0, sigma), eps, **ROUND_TRIP)


def test_v_is_the_velocity_along_the_circle(draws):
    """v_from_x0_eps's docstring: v = dx_t/dφ for x_t = cos φ x_0 + sin φ ε with cos φ = √ᾱ_t. Central differences
    with h = 1e-5: truncation ≈ h²/6·|x| ≈ 1e-10 and rounding ≈ 2.2e-16·|x|/h ≈ 1e-10; measured max error 1.1e-10."""
    x0, eps, ab = draws
    phi, h = torch.arccos(ab**0.5), 1e-5

    def x_at(angle):
        return torch.cos(angle) * x0 + torch.sin(angle) * eps

    torch.testing.assert_close(xt_from_x0_eps(x0, eps, ab), x_at(phi), **ROUND_TRIP)
    velocity = (x_at(phi + h) - x_at(phi - h)) / (2 * h)
    torch.testing.assert_close(v_from_x0_eps(x0, eps, ab), velocity, rtol=0.0, atol=1e-9)


def test_eps_in_sigma_scaling_is_the_probability_flow_slope():
    """eps_from_x0_sigma's docstring: with the exact denoiser, (x − D(x, σ))/σ is dx/dσ along the probability-flow
    ODE. For data N(μ, s²) both are closed form (scripts/sampler_convergence.py): D(x, σ) = μ + s²/(s²+σ²) (x − μ),
    and the ODE's paths are x(σ) = μ + c √(s²+σ²)."""
    mu, s, h = 0.5, 1.0, 1e-4
    c = torch.linspace(-3, 3, 13, dtype=torch.float64)  # one path per c

    def x_at(sigma):
        return mu + c * (s**2 + sigma**2) ** 0.5

    for sigma in (0.03, 1.0, 14.6):
        x = x_at(sigma)
        slope = (x_at(sigma + h) - x_at(sigma - h)) / (2 * h)
        # central differences: truncation h²/6·|c|·|d³√(1+σ²)/dσ³|, at most 1e-8/6 · 3 · 0.53 = 2.7e-9 of these σ's
        # (at σ = 1; measured 2.65e-9), rounding 2.2e-16·|x|/h ≈ 1e-10 at σ = 14.6; bound 1e-8
        torch.testing.assert_close(eps_from_x0_sigma(x, mu + s**2 / (s**2 + sigma**2) * (x - mu), sigma), slope,
                                   rtol=0.0, atol=1e-8)


def test_schedule_methods_are_the_functions_at_alpha_bar_t(schedule, draws):
    """The same equations whether ᾱ comes as Schedule's `[B, 1, 1, 1]` tensor or as a Python float (the samplers).
    Not bit for bit: a tensor's `** 0.5` is torch's sqrt, a float's is the C library's pow, and they may differ in
    the last bit (glibc here: for (1 − ᾱ_535), and for ~0.1% of random doubles), as other C libraries may elsewhere.
    One ulp of a coefficient moves these outputs by ≤ 1e-14 (measured 9.4e-16 at t = 535), so ROUND_TRIP's 1e-13;
    a swapped or wrong coefficient moves them by ~0.1 or more."""
    t = [0, 500, 535, 999]
    x0, eps = draws[0][:4], draws[1][:4]
    x_t, v = schedule.q_sample(x0, torch.tensor(t), eps), schedule.v_from_x0_eps(x0, torch.tensor(t), eps)
    for i, t_i in enumerate(t):
        ab, one = float(schedule.alpha_bar[t_i]), slice(i, i + 1)
        torch.testing.assert_close(x_t[one], xt_from_x0_eps(x0[one], eps[one], ab), **ROUND_TRIP)
        torch.testing.assert_close(schedule.eps_to_x0(x_t[one], t_i, eps[one]), x0_from_eps(x_t[one], eps[one], ab),
                                   **ROUND_TRIP)
        torch.testing.assert_close(schedule.x0_to_eps(x_t[one], t_i, x0[one]), eps_from_x0(x_t[one], x0[one], ab),
                                   **ROUND_TRIP)
        torch.testing.assert_close(v[one], v_from_x0_eps(x0[one], eps[one], ab), **ROUND_TRIP)
        torch.testing.assert_close(schedule.v_to_x0(x_t[one], t_i, v[one]), x0_from_v(x_t[one], v[one], ab),
                                   **ROUND_TRIP)
        torch.testing.assert_close(schedule.v_to_eps(x_t[one], t_i, v[one]), eps_from_v(x_t[one], v[one], ab),
                                   **ROUND_TRIP)
    # both sides tensors: the very same torch arithmetic on the same numbers, so bit for bit
    assert torch.equal(schedule.sigmas, sigma_from_alpha_bar(schedule.alpha_bar))


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
