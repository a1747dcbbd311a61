"""DPM-Solver++(2M) — Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models" (arXiv:2211.01095), Algorithm 2, written in σ as k-diffusion's `sample_dpmpp_2m`.

In the VP form x_t = α_t x_0 + σ_t ε with λ_t = log(α_t/σ_t), the ODE for x̂₀-predictions is solved exactly in
its linear part (eq. 9); with x_σ = x_t / α_t and σ = σ_t/α_t that is λ = −log σ and (Algorithm 2, line 6–8)

    h_i = λ_{i+1} − λ_i,   r_i = h_{i−1} / h_i
    D_i = (1 + 1/(2 r_i)) x̂₀(x_i, σ_i) − 1/(2 r_i) x̂₀(x_{i−1}, σ_{i−1})       (first step: D_0 = x̂₀)
    x_{i+1} = (σ_{i+1}/σ_i) x_i − (e^{−h_i} − 1) D_i

The last step, to σ = 0 (h = ∞), gives x = x̂₀ (diffusers' `lower_order_final` / `final_sigmas_type="zero"`).

Timesteps follow diffusers' DPMSolverMultistepScheduler, whose spacing rule is its own: N + 1 grid points, the last
dropped, integer t (`spaced_timesteps(intervals=True, integer=True)`): "linspace" (default)
t = round(linspace(0, T−1, N+1))[::-1][:-1]; "leading" k = T // (N+1); "trailing" as elsewhere. Karras σ's span the
whole training range σ(0) … σ(T−1) whatever the spacing, and the model is given round(t(σ)).
Its state is x_t = ε at the start, i.e. x_σ = √(σ_0²+1) ε here.
Step counts: the integer grid of N + 1 points needs N + 1 distinct timesteps, so N ≤ T − 1 for "linspace" (at N = T
a timestep repeats, h = 0, and r = h_{i−1}/h divided by zero), T − 2 for "leading" with steps_offset 1, T for
"trailing"; Karras σ's are all distinct, so N ≤ T. Larger counts are refused before the first model call.
Defaults = diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2) from the SD v1.5
config: spacing "linspace", no Karras.
"""

import math

import numpy as np
import torch

from .base import SigmaSampler, karras_sigmas, too_many_steps


class DPMSolverPP2M(SigmaSampler):
    intervals = integer_timesteps = True  # DPM-Solver's own timestep rule (see the module docstring)

    def sigmas_and_timesteps(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.karras:
            return super().sigmas_and_timesteps(steps)
        if steps > self.schedule.n_train_steps:  # Karras σ's ignore the spacing's grid, but not this limit
            raise ValueError(f"steps={steps} {too_many_steps(self.schedule.n_train_steps)}; use steps ≤ "
                             f"{self.schedule.n_train_steps}")
        sigmas = karras_sigmas(float(self.schedule.sigmas[0]), float(self.schedule.sigmas[-1]), steps)
        return np.append(sigmas, 0.0), self.schedule.sigma_to_t(torch.from_numpy(sigmas)).numpy().round()

    def initial_scale(self, sigma_max: float) -> float:
        return (sigma_max**2 + 1) ** 0.5  # diffusers' DPM state starts at x_t = ε, and x_σ = √(σ²+1) x_t

    def _run(self, eps_model, noise, steps, start, x0, generator, step_done):
        sigmas, ts, denoise, x = self._plan(eps_model, noise, steps, start, x0)
        old_x0_pred, h_prev = None, None
        for i, t in enumerate(ts):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            x0_pred = denoise(x, sigma, t)
            if sigma_next == 0:
                x = x0_pred  # h = ∞: the exponential integrator lands on x̂₀
            else:
                h = math.log(sigma) - math.log(sigma_next)  # h_i = λ_{i+1} − λ_i, λ = −log σ
                if old_x0_pred is None:
                    d = x0_pred  # first step: DPM-Solver++(1) = DDIM
                else:
                    r = h_prev / h  # r_i = h_{i−1} / h_i
                    d = (1 + 1 / (2 * r)) * x0_pred - 1 / (2 * r) * old_x0_pred  # D_i
                x = (sigma_next / sigma) * x - math.expm1(-h) * d  # x_{i+1} = (σ_{i+1}/σ_i) x_i − (e^{−h}−1) D_i
                h_prev = h
            old_x0_pred = x0_pred
            x = step_done(i, t, x0_pred, x)
        return x
