"""LMS — linear multistep on the probability-flow ODE in σ (k-diffusion's `sample_lms`, Katherine Crowson).

The ODE dx/dσ = d(x, σ) = (x − D(x, σ)) / σ (Karras et al. 2022, eq. 3) is integrated with the Adams–Bashforth
idea on a *non-uniform* grid: interpolate the last k slopes d_i, d_{i−1}, … by the Lagrange polynomial through
σ_i, σ_{i−1}, … and integrate it exactly over [σ_i, σ_{i+1}]:

    x_{i+1} = x_i + Σ_j c_j d_{i−j},    c_j = ∫_{σ_i}^{σ_{i+1}} ∏_{m≠j} (τ − σ_{i−m}) / (σ_{i−j} − σ_{i−m}) dτ

(the variable-step Adams methods of Hairer, Nørsett & Wanner, *Solving ODEs I*, §III.5). The basis polynomials have
degree ≤ 3, so their antiderivatives are taken exactly (numpy polynomials), not by quadrature. Order k = 4, lower
while fewer slopes exist (k = 1 is Euler).

Defaults = diffusers' LMSDiscreteScheduler from the SD v1.5 config: spacing "linspace", no Karras, order 4.
img2img: the order grows from 1 at the first step that runs; diffusers instead picks its order from the absolute
step index, which pairs a 4th-order coefficient with a single slope — a bug we do not copy.
"""

import numpy as np
from numpy.polynomial import Polynomial

from ..diffusion import Schedule, eps_from_x0_sigma
from .base import SigmaSampler


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """c_0 … c_{order−1} for the step σ_i → σ_{i+1}, using nodes σ_i, σ_{i−1}, …, σ_{i−order+1}."""
    nodes = [float(sigmas[i - j]) for j in range(order)]
    coefficients = []
    for j, node in enumerate(nodes):
        others = nodes[:j] + nodes[j + 1:]
        basis = Polynomial([1.0])  # ℓ_j(τ) = ∏_{m≠j} (τ − σ_{i−m}) / (σ_{i−j} − σ_{i−m}); just 1 for order 1
        for other in others:
            basis = basis * Polynomial([-other, 1.0]) / (node - other)
        antiderivative = basis.integ()
        coefficients.append(float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])))  # ∫_{σ_i}^{σ_{i+1}} ℓ_j
    return coefficients


class LMS(SigmaSampler):
    def __init__(self, schedule: Schedule | None = None, *, order: int = 4, timestep_spacing: str = "linspace",
                 steps_offset: int = 1, karras: bool = False):
        super().__init__(schedule, timestep_spacing=timestep_spacing, steps_offset=steps_offset, karras=karras)
        if order < 1:
            raise ValueError(f"order must be ≥ 1, got {order}")
        self.order = order

    def _run(self, eps_model, noise, steps, start, x0, generator, step_done):
        sigmas, ts, denoise, x = self._plan(eps_model, noise, steps, start, x0)
        slopes = []  # d_i, d_{i−1}, … newest first
        for i, t in enumerate(ts):
            sigma = float(sigmas[i])
            x0_pred = denoise(x, sigma, t)
            slopes = [eps_from_x0_sigma(x, x0_pred, sigma)] + slopes[: self.order - 1]  # d_i = (x_i − D(x_i, σ_i))/σ_i
            coefficients = lms_coefficients(sigmas, i, len(slopes))
            x = x + sum(c * d for c, d in zip(coefficients, slopes))  # x_{i+1} = x_i + Σ_j c_j d_{i−j}
            x = step_done(i, t, x0_pred, x)
        return x
