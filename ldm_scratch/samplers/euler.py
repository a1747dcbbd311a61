"""Euler and Euler-ancestral on the probability-flow ODE in σ — Karras, Aittala, Aila & Laine 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models" (arXiv:2206.00364), as implemented in k-diffusion.

With x_σ = x_0 + σ ε and the denoiser D(x, σ) = x̂₀, the probability-flow ODE is (eq. 3 with σ(t) = t)

    dx/dσ = (x − D(x, σ)) / σ   (= ε̂)

Euler: x_{i+1} = x_i + (σ_{i+1} − σ_i) · (x_i − D(x_i, σ_i)) / σ_i     (Algorithm 1 without its 2nd-order correction)

Euler-ancestral (k-diffusion's `sample_euler_ancestral`): instead of going straight to σ_{i+1}, go deterministically
down to σ_down and add fresh noise of std σ_up, split so the marginal is right, σ_down² + σ_up² = σ_{i+1}², with
σ_up = √(σ_{i+1}² (σ_i² − σ_{i+1}²) / σ_i²) — the DDPM ancestral step's noise (Ho et al. 2020 eq. 7's β̃) written
in σ. One noise draw per step, the last included (σ_up = 0 there), as diffusers.
Defaults = diffusers' Euler(Ancestral)DiscreteScheduler from the SD v1.5 config: spacing "linspace", no Karras.
"""

from ..diffusion import eps_from_x0_sigma
from .base import SigmaSampler, draw_noise


class Euler(SigmaSampler):
    ancestral = False

    def _run(self, eps_model, noise, steps, start, x0, generator, step_done):
        sigmas, ts, denoise, x = self._plan(eps_model, noise, steps, start, x0)
        for i, t in enumerate(ts):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            x0_pred = denoise(x, sigma, t)
            d = eps_from_x0_sigma(x, x0_pred, sigma)  # dx/dσ = (x − D(x, σ)) / σ
            if self.ancestral:
                sigma_up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
                sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5  # σ_down² + σ_up² = σ_{i+1}²
                x = x + d * (sigma_down - sigma)  # deterministic part, down to σ_down
                x = x + sigma_up * draw_noise(x, generator)  # fresh noise back up to σ_{i+1}
            else:
                x = x + d * (sigma_next - sigma)  # x_{i+1} = x_i + (σ_{i+1} − σ_i) d_i
            x = step_done(i, t, x0_pred, x)
        return x


class EulerAncestral(Euler):
    ancestral = True
