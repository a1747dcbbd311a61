"""Error-vs-steps table for every sampler driven by the exact denoiser of Gaussian data (issue 4).

If the data is x₀ ~ N(μ, s² I), then x_σ = x₀ + σε ~ N(μ, (s²+σ²) I) and the optimal predictions are closed form:

    D*(x_σ, σ) = E[x₀ | x_σ] = μ + s²/(s²+σ²) (x_σ − μ)
    ε*(x_t, t) = E[ε | x_t]   = √(1−ᾱ_t) (x_t − √ᾱ_t μ) / (ᾱ_t s² + 1 − ᾱ_t)

and so are the exact answers the samplers approximate. In σ-scaling, started from x_{σ_T} ~ N(m_T, v_T):
- the probability-flow ODE maps x − μ ↦ (x − μ) √(s²+σ_e²)/√(s²+σ_T²) (deterministic: compared sample by sample);
- the reverse SDE (ancestral samplers) leaves mean μ + (m_T−μ) ρ and variance (s²+σ_e²) + (v_T − s² − σ_T²) ρ²
  with ρ = (s²+σ_e²)/(s²+σ_T²)  (compared by the samples' mean and std).
σ_e is where the sampler stops: 0 for σ-samplers and DDPM, σ(t=0) for DDIM/PLMS/PNDM (SD v1.5's ᾱ_0 final level),
whose output is also in DDPM scaling (× √ᾱ_e). SD v1's schedule ends at ᾱ_999 ≈ 0.0047, not 0, so even an exact
sampler does not give mean μ from x_T = ε: the table prints that gap ("limit−μ") separately.

Floor: every schedule ends with one jump σ_min → 0 (σ_min = σ(t=0) ≈ 0.029 for "linspace") that more steps never
refine. Taken by Euler (Heun's last step) or by x = x̂₀ (DPM++), it is off by ≈ σ_min²/(2s²) · |x − μ| (≈ 4e-4·|x−μ|
for s = 1), so the high-order samplers stop improving at ~1e-3 in the max column: a property of the schedule,
not of the solvers (LMS avoids most of it by reusing earlier slopes on the last step).

    python scripts/sampler_convergence.py [--n 65536] [--steps 5 10 20 50 100 200]   (≈ 25 s; PYTHONPATH=. if not installed)
"""

import argparse
import math

import torch

from ldm_scratch.diffusion import Schedule, alpha_bar_from_sigma, sigma_from_alpha_bar
from ldm_scratch.samplers import get_sampler
from ldm_scratch.samplers.base import AlphaBarSampler

MU, S = 0.5, 1.0


def gaussian_eps_model(schedule: Schedule, mu: float = MU, s: float = S):
    """ε*(x_t, t) for data N(μ, s² I); t may be fractional (ᾱ from log-σ interpolation, as sigma_to_t inverts)."""

    def eps_model(x_t, t):
        sigma = float(schedule.t_to_sigma(t.double()))
        alpha_bar = alpha_bar_from_sigma(sigma)  # ᾱ = 1 / (1 + σ²)
        return (1 - alpha_bar) ** 0.5 * (x_t - alpha_bar**0.5 * mu) / (alpha_bar * s**2 + 1 - alpha_bar)

    return eps_model


def start_and_end(sampler, steps: int):
    """(σ_T, v_T scale c so that x_{σ_T} = c ε, σ_e, output scale √ᾱ_e) for a txt2img run."""
    sched = sampler.schedule
    if isinstance(sampler, AlphaBarSampler):
        t0 = int(sampler.timesteps(steps)[0])
        sigma_T = float(sched.sigmas[t0])
        c = (sigma_T**2 + 1) ** 0.5  # x_t = ε in DDPM scaling is x_σ = √(σ²+1) ε
        final = getattr(sampler, "final_alpha_bar", 1.0)
        return sigma_T, c, sigma_from_alpha_bar(final), final**0.5
    sigmas, _ = sampler.sigmas_and_timesteps(steps)
    return float(sigmas[0]), sampler.initial_scale(float(sigmas[0])), 0.0, 1.0


def exact_ode(noise, sampler, steps, mu=MU, s=S):
    sigma_T, c, sigma_e, out = start_and_end(sampler, steps)
    x_T = c * noise
    return out * (mu + (x_T - mu) * math.sqrt(s**2 + sigma_e**2) / math.sqrt(s**2 + sigma_T**2))


def sde_limit(sampler, steps, mu=MU, s=S):
    """(mean, std) of the output of the exact reverse SDE from the sampler's start."""
    sigma_T, c, sigma_e, out = start_and_end(sampler, steps)
    rho = (s**2 + sigma_e**2) / (s**2 + sigma_T**2)
    mean = mu + (0.0 - mu) * rho
    var = (s**2 + sigma_e**2) + (c**2 - s**2 - sigma_T**2) * rho**2
    return out * mean, out * var**0.5


DETERMINISTIC = [("ddim", {}), ("plms", {}), ("pndm", {}), ("lms", {}), ("lms", {"karras": True}),
                 ("euler", {}), ("euler", {"karras": True}), ("heun", {}), ("heun", {"karras": True}),
                 ("dpmpp_2m", {}), ("dpmpp_2m", {"karras": True})]
ANCESTRAL = [("ddpm", {}), ("ddpm", {"variance_type": "fixed_large"}), ("ddim", {"eta": 1.0}), ("euler_a", {})]


def label(name, options):
    return name + "".join(f" {k}={v}" for k, v in options.items())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=65536, help="numbers per run (samples × dims)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100, 200])
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors: threads only contend
    schedule = Schedule()
    model = gaussian_eps_model(schedule)
    noise = torch.randn(args.n // 256, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    print(f"data N(μ={MU}, s={S}²); deterministic: max |x − exact ODE solution| over {noise.numel()} numbers")
    print(f"{'sampler':28s}" + "".join(f"{n:>10d}" for n in args.steps))
    for name, options in DETERMINISTIC:
        sampler = get_sampler(name, **options)
        errors = [(sampler.sample(model, noise, n) - exact_ode(noise, sampler, n)).abs().max().item() for n in args.steps]
        print(f"{label(name, options):28s}" + "".join(f"{e:10.2e}" for e in errors))

    print(f"\nancestral: |mean − SDE limit| / |std − SDE limit| (MC std error ≈ {S / noise.numel() ** 0.5:.1e})")
    print(f"{'sampler':28s}" + "".join(f"{n:>20d}" for n in args.steps) + "      limit−μ, limit−s")
    for name, options in ANCESTRAL:
        sampler = get_sampler(name, **options)
        cells = []
        for n in args.steps:
            x = sampler.sample(model, noise, n, generator=torch.Generator().manual_seed(1))
            mean, std = sde_limit(sampler, n)
            cells.append(f"{abs(x.mean().item() - mean):9.1e}/{abs(x.std().item() - std):9.1e}")
        mean, std = sde_limit(sampler, args.steps[-1])
        print(f"{label(name, options):28s}" + "".join(f"{c:>20s}" for c in cells) + f"   {mean - MU:+.1e}, {std - S:+.1e}")


if __name__ == "__main__":
    main()
