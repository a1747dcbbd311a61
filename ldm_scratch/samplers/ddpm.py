"""DDPM ancestral sampling — Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239).

The reverse step p_θ(x_{t−1} | x_t) = N(μ_θ, σ_t² I) (seed eq 4.2) uses the true posterior q(x_{t−1} | x_t, x̂₀)
(eqs 6–7) with x̂₀ from the predicted noise (eq 4.1 solved for x_0):

    μ_θ = √ᾱ_{t−1} β_t / (1−ᾱ_t) · x̂₀  +  √α_t (1−ᾱ_{t−1}) / (1−ᾱ_t) · x_t             (eq. 7)
    σ_t² = β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) · β_t   ("fixed_small")   or   σ_t² = β_t   ("fixed_large")   (§3.2)

With fewer steps than T the chain is strided: t−1 means the next timestep in the list and β_t = 1 − ᾱ_t/ᾱ_{t−1}
(diffusers' DDPMScheduler). After the last step ᾱ = 1 (the chain ends at x_0). Noise is drawn at every step whose
t > 0, as diffusers does. Defaults = diffusers' DDPMScheduler from the SD v1.5 config: spacing "leading",
steps_offset 1, "fixed_small", no clipping of x̂₀.
"""

from ..diffusion import Schedule, posterior_coefficients
from .base import AlphaBarSampler, as_model_t, draw_noise

VARIANCE_TYPES = ("fixed_small", "fixed_large")


class DDPM(AlphaBarSampler):
    def __init__(self, schedule: Schedule | None = None, *, variance_type: str = "fixed_small",
                 timestep_spacing: str = "leading", steps_offset: int = 1):
        super().__init__(schedule, timestep_spacing=timestep_spacing, steps_offset=steps_offset)
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        self.variance_type = variance_type

    def _run(self, eps_model, noise, steps, start, x0, generator, step_done):
        all_ts = self.timesteps(steps)
        ts = all_ts[start:]
        x = self._begin(noise, x0, ts)
        for i, t in enumerate(ts):
            t_prev = int(all_ts[start + i + 1]) if start + i + 1 < steps else -1
            alpha_bar, alpha_bar_prev = self._alpha_bar(int(t), 1.0), self._alpha_bar(t_prev, 1.0)
            _, x0_pred = self.predicted(x, eps_model(x, as_model_t(t, x)), alpha_bar)  # x̂₀ from ε̂ or v̂
            coef_x0, coef_xt, beta_tilde = posterior_coefficients(alpha_bar, alpha_bar_prev)
            mean = coef_x0 * x0_pred + coef_xt * x  # μ_θ  (eq. 7)
            if self.variance_type == "fixed_small":
                variance = max(beta_tilde, 1e-20)  # σ_t² = β̃_t  (diffusers clamps it away from 0 too)
            else:
                variance = 1 - alpha_bar / alpha_bar_prev  # σ_t² = β_t
            x = mean + variance**0.5 * draw_noise(x, generator) if t > 0 else mean  # x_{t−1} = μ_θ + σ_t z
            x = step_done(i, t, x0_pred, x)
        return x
