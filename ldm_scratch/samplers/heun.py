"""Heun's 2nd-order method on the probability-flow ODE — Karras et al. 2022 (arXiv:2206.00364), Algorithm 1.

    d_i  = (x_i − D(x_i, σ_i)) / σ_i                                   (eq. 3: dx/dσ)
    x̃    = x_i + (σ_{i+1} − σ_i) d_i                                   (Euler predictor, line 5)
    d'_i = (x̃ − D(x̃, σ_{i+1})) / σ_{i+1}                               (slope at the far end, line 7)
    x_{i+1} = x_i + (σ_{i+1} − σ_i) (d_i + d'_i) / 2                    (trapezoid corrector, line 8)

The last step, to σ = 0, is plain Euler (line 6: the slope at σ = 0 is undefined), so N steps cost 2N − 1 model
calls. One callback per σ interval, with x̂₀ from its first evaluation. (diffusers' HeunDiscreteScheduler counts
each evaluation as a step over an interleaved list [t_0, t_1, t_1, t_2, …]; the arithmetic is the same.)
Defaults = diffusers' HeunDiscreteScheduler from the SD v1.5 config: spacing "linspace", no Karras.
"""

from ..diffusion import eps_from_x0_sigma
from .base import SigmaSampler


class Heun(SigmaSampler):
    def _run(self, eps_model, noise, steps, start, x0, generator, step_done):
        sigmas, ts, denoise, x = self._plan(eps_model, noise, steps, start, x0)
        for i, t in enumerate(ts):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            x0_pred = denoise(x, sigma, t)
            d = eps_from_x0_sigma(x, x0_pred, sigma)  # d_i = (x_i − D(x_i, σ_i)) / σ_i
            x_euler = x + d * (sigma_next - sigma)  # x̃ = x_i + (σ_{i+1} − σ_i) d_i
            if sigma_next == 0:
                x = x_euler  # last step: Euler
            else:
                d_next = eps_from_x0_sigma(x_euler, denoise(x_euler, sigma_next, ts[i + 1]), sigma_next)  # d'_i
                x = x + (d + d_next) / 2 * (sigma_next - sigma)  # x_{i+1} = x_i + (σ_{i+1} − σ_i)(d_i + d'_i)/2
            x = step_done(i, t, x0_pred, x)
        return x
