"""Samplers driven by the exact denoiser of Gaussian data (closed-form answers), plus the interface: names, options,
img2img, the inpainting hooks, generators. The long error-vs-steps table is scripts/sampler_convergence.py."""

import math

import numpy as np
import pytest
import torch

from ldm_scratch.diffusion import Schedule
from ldm_scratch.samplers import DDIM, SAMPLERS, get_sampler, spaced_timesteps
from ldm_scratch.samplers.lms import lms_coefficients
from sampler_convergence import MU, S, exact_ode, gaussian_eps_model, sde_limit


pytestmark = pytest.mark.usefixtures("one_thread")


SCHEDULE = Schedule()
MODEL = gaussian_eps_model(SCHEDULE)


def noise(n=64, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# max |x − exact ODE solution| at 10 / 50 steps (s = 1, 256 draws of 4×8×8), measured with
# scripts/sampler_convergence.py over 65536 numbers: ddim 0.52/0.11, plms 0.032/0.0025, lms 0.071/4.1e-4,
# euler 0.59/0.12, heun 0.11/1.7e-3, dpmpp_2m 0.23/0.032, heun karras 0.24/5.6e-3, lms karras 0.21/9e-4.
# Bounds: the 50-step value × ~2 (fewer numbers here can only lower a max), and 50 steps must beat 10 by the
# method's order: first-order ≥ 4× (5× fewer steps), higher order ≥ 8×. dpmpp_2m is first-order here because its
# last σ before 0 shrinks with the step count (see the script's note on the final jump).
DETERMINISTIC = [
    ("ddim", {}, 0.25, 4), ("plms", {}, 5e-3, 8), ("pndm", {}, 5e-3, 8), ("lms", {}, 1e-3, 8),
    ("lms", {"karras": True}, 2e-3, 8), ("euler", {}, 0.25, 4), ("euler", {"karras": True}, 0.3, 4),
    ("heun", {}, 4e-3, 8), ("heun", {"karras": True}, 1.2e-2, 8), ("dpmpp_2m", {}, 0.07, 4),
    ("dpmpp_2m", {"karras": True}, 1.2e-2, 8),
]


@pytest.mark.parametrize("name, options, bound50, gain", DETERMINISTIC, ids=lambda v: str(v))
def test_deterministic_samplers_converge_to_the_exact_ode_solution(name, options, bound50, gain):
    sampler, x_T = get_sampler(name, **options), noise(256)
    err = {n: (sampler.sample(MODEL, x_T, n) - exact_ode(x_T, sampler, n)).abs().max().item() for n in (10, 50)}
    assert err[50] < bound50
    assert err[10] / err[50] > gain


@pytest.mark.parametrize("name, options", [("ddpm", {}), ("ddpm", {"variance_type": "fixed_large"}),
                                           ("ddim", {"eta": 1.0}), ("euler_a", {})], ids=str)
def test_ancestral_samplers_converge_in_distribution(name, options):
    """Mean and std of 65536 numbers against the exact reverse-SDE limit (Monte-Carlo std error ≈ s/256 ≈ 0.004):
    the std error shrinks with steps (measured at 10 → 100 steps: 0.20 → 0.031 fixed_small / DDIM η=1 / Euler-a,
    0.0025 → 0.0007 fixed_large) and the mean stays within 5 standard errors; the limit itself is within
    0.003 of μ = 0.5 and 1e-5 of s = 1 (SD's last ᾱ is not 0)."""
    sampler, x_T = get_sampler(name, **options), noise(1024)
    stats = {}
    for n in (10, 100):
        x = sampler.sample(MODEL, x_T, n, generator=torch.Generator().manual_seed(1))
        mean, std = sde_limit(sampler, n)
        stats[n] = (abs(x.mean().item() - mean), abs(x.std().item() - std))
        assert stats[n][0] < 5 * S / x.numel() ** 0.5
    assert stats[100][1] < 0.04
    assert stats[100][1] < stats[10][1] or stats[10][1] < 5 * S / x_T.numel() ** 0.5
    mean, std = sde_limit(sampler, 100)
    assert abs(mean - MU) < 0.01 and abs(std - S) < 0.01


def test_ddim_eta0_is_deterministic_and_invertible():
    ddim, x_T = DDIM(), noise(16)
    x0 = ddim.sample(MODEL, x_T, 50, generator=torch.Generator().manual_seed(5))
    assert torch.equal(x0, ddim.sample(MODEL, x_T, 50))  # no randomness at η = 0
    # inversion evaluates ε̂ one level off, so it is exact only as steps → ∞: measured max |x_T − invert(x0)|
    # 0.17 (20 steps), 0.048 (100), 0.024 (200)
    errors = [(ddim.invert(MODEL, ddim.sample(MODEL, x_T, n), n) - x_T).abs().max().item() for n in (20, 200)]
    assert errors[1] < 0.05 and errors[0] / errors[1] > 4


def test_lms_coefficients_integrate_polynomials_exactly():
    sigmas = [14.6, 9.1, 5.0, 2.2, 0.9]
    # the rule with k nodes integrates any polynomial of degree < k exactly: ∫ τ² over [σ_3, σ_4] from 3 nodes
    c = lms_coefficients(sigmas, 3, 3)
    nodes = [sigmas[3], sigmas[2], sigmas[1]]
    assert sum(cj * node**2 for cj, node in zip(c, nodes)) == pytest.approx((0.9**3 - 2.2**3) / 3, rel=1e-12)
    assert lms_coefficients(sigmas, 0, 1) == [pytest.approx(9.1 - 14.6)]  # order 1 is Euler


def test_spacing_and_sd15_defaults():
    # SD v1.5: "leading" with steps_offset 1 → 1, 21, …, 981 for 50 steps (DESIGN.md)
    assert spaced_timesteps(50, "leading", 1).tolist() == list(range(981, 0, -20))
    assert spaced_timesteps(50, "trailing", 1)[0] == 999 and spaced_timesteps(50, "linspace", 1)[0] == 999
    # DPM-Solver's rule (intervals=True): steps + 1 grid points, the last one dropped
    linspace = spaced_timesteps(20, "linspace", 1, intervals=True, integer=True)
    assert linspace.dtype == np.int64 and linspace.tolist() == np.linspace(0, 999, 21).round()[::-1][:-1].tolist()
    assert spaced_timesteps(20, "leading", 1, intervals=True).tolist() == list(range(20 * 47 + 1, 1, -47))  # 1000 // 21
    assert (spaced_timesteps(20, "trailing", 1, intervals=True) == spaced_timesteps(20, "trailing", 1)).all()
    assert spaced_timesteps(3, "linspace", 1, integer=True).tolist() == [999, 500, 0]  # 499.5 rounds half to even
    for name in ("ddpm", "ddim", "plms", "pndm"):
        sampler = get_sampler(name)
        assert (sampler.timestep_spacing, sampler.steps_offset) == ("leading", 1)
    assert get_sampler("ddim").final_alpha_bar == pytest.approx(SCHEDULE.alpha_bar[0].item())  # set_alpha_to_one=False
    for name in ("lms", "euler", "euler_a", "heun", "dpmpp_2m"):
        sampler = get_sampler(name)
        assert (sampler.timestep_spacing, sampler.karras) == ("linspace", False)


def test_plms_equals_pndm_for_leading_spacing():
    x_T = noise(4)
    a, b = get_sampler("plms").sample(MODEL, x_T, 20), get_sampler("pndm").sample(MODEL, x_T, 20)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_get_sampler_names_and_errors():
    assert set(SAMPLERS) == {"ddpm", "ddim", "plms", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m",
                             "lcm"}
    with pytest.raises(ValueError, match="valid names: ddpm, ddim"):
        get_sampler("dpm2")
    with pytest.raises(ValueError, match="does not take option"):
        get_sampler("euler", eta=0.5)
    with pytest.raises(ValueError, match="timestep_spacing"):
        get_sampler("ddim", timestep_spacing="uniform")
    with pytest.raises(ValueError, match="rounds down to 0 steps"):
        get_sampler("ddim").sample(MODEL, noise(1), 10, x0=noise(1), strength=0.05)
    with pytest.raises(ValueError, match="must match"):
        get_sampler("ddim").sample(MODEL, noise(1), 10, x0=noise(2))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_img2img_runs_int_steps_times_strength(name):
    sampler, x_T, x0 = get_sampler(name), noise(2), noise(2, seed=9)
    calls = []
    sampler.sample(MODEL, x_T, 20, x0=x0, strength=0.55, callback=lambda i, t, x0_pred: calls.append(i),
                   generator=torch.Generator().manual_seed(0))
    # pndm's list has one extra entry (t_1 twice); lcm runs every step on a grid cut by strength (lcm.py)
    n_run = 20 if name == "lcm" else int(20 * 0.55) + (1 if name == "pndm" else 0)
    assert calls == list(range(n_run))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_mask_blend_keeping_everything_returns_x0(name):
    """after_step + noise_to_level with a mask that keeps the whole original: the output is x0 exactly, and each
    level handed back matches the level the sampler is at (x0 noised with the same noise)."""
    sampler, x_T, x0 = get_sampler(name), noise(2), noise(2, seed=9)
    out = sampler.sample(MODEL, x_T, 12, after_step=lambda i, x: sampler.noise_to_level(x0, x_T, i),
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x0)


def test_ancestral_noise_comes_from_the_generator():
    sampler, x_T = get_sampler("euler_a"), noise(2)
    a = sampler.sample(MODEL, x_T, 10, generator=torch.Generator().manual_seed(3))
    b = sampler.sample(MODEL, x_T, 10, generator=torch.Generator().manual_seed(3))
    c = sampler.sample(MODEL, x_T, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_model_sees_a_scalar_float32_t_and_ddpm_scaled_input():
    """σ-samplers hand the model x_σ/√(σ²+1) (unit-variance noise at the start) and a 0-dim float32 t."""
    seen = []

    def spy(x_t, t):
        seen.append((x_t.std().item(), t.dtype, t.dim()))
        return MODEL(x_t, t)

    get_sampler("euler").sample(spy, noise(64).float(), 5)
    assert all(dtype == torch.float32 and dim == 0 for _, dtype, dim in seen)
    assert math.isclose(seen[0][0], 1.0, rel_tol=0.02)


def test_a_list_of_generators_draws_row_by_row():
    """diffusers' convention: row i of every draw comes from generator i, so image i does not depend on the batch."""
    sampler, x_T = get_sampler("euler_a"), noise(2)
    both = sampler.sample(MODEL, x_T, 5, generator=[torch.Generator().manual_seed(s) for s in (7, 8)])
    second = sampler.sample(MODEL, x_T[1:], 5, generator=[torch.Generator().manual_seed(8)])
    # measured bit-identical here; but a batch of 2 and a batch of 1 are different kernel calls (rows can fall
    # differently into vectorised and scalar loops), so float64 precision: 1e-12 on outputs of order 5. Row 1 drawn
    # from the wrong generator would differ by the ancestral noise, of order 0.1–1.
    torch.testing.assert_close(both[1:], second, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one per row"):
        sampler.sample(MODEL, x_T, 5, generator=[torch.Generator()])
