"""DDIM — Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (arXiv:2010.02502).

Beware: the DDIM paper's α_t is DDPM's (and our) ᾱ_t. In our notation, eq. (12) is

    x_{t−1} = √ᾱ_{t−1} · x̂₀  +  √(1 − ᾱ_{t−1} − σ_t²) · ε̂  +  σ_t z,     x̂₀ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t
              "predicted x_0"    "direction pointing to x_t"      noise

with σ_t = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1})  (eq. 16). η = 0 is deterministic (the probability-flow
ODE discretised, invertible: see `invert`); η = 1 is DDPM's ancestral sampler on the strided chain.

Steps follow diffusers' DDIMScheduler: the previous timestep is t − T // steps (equal to the next one in the list
for "leading", SD v1.5's default, and for "trailing" when steps divides T), and the level after the last step is
ᾱ_0 when set_alpha_to_one=False (SD v1.5) or 1. Defaults = SD v1.5: spacing "leading", steps_offset 1, η = 0.
"""

import torch

from ..diffusion import Schedule, x0_from_eps
from .base import AlphaBarSampler, as_model_t, draw_noise


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_prev: float, sigma: float = 0.0,
              x0_pred: torch.Tensor | None = None):
    """One DDIM update (eq. 12) without the noise term; returns (x_prev, x0_pred). x0_pred: the model's x̂₀ when it
    has one of its own (a v-model's, Sampler.predicted); by default it is read off ε̂."""
    if x0_pred is None:
        x0_pred = x0_from_eps(x, eps, alpha_bar)  # x̂₀ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t
    direction = (1 - alpha_bar_prev - sigma**2) ** 0.5 * eps  # √(1 − ᾱ_{t−1} − σ_t²) ε̂
    return alpha_bar_prev**0.5 * x0_pred + direction, x0_pred  # x_{t−1} = √ᾱ_{t−1} x̂₀ + direction


class DDIM(AlphaBarSampler):
    def __init__(self, schedule: Schedule | None = None, *, eta: float = 0.0, timestep_spacing: str = "leading",
                 steps_offset: int = 1, set_alpha_to_one: bool = False):
        super().__init__(schedule, timestep_spacing=timestep_spacing, steps_offset=steps_offset)
        self.eta = eta
        self.final_alpha_bar = 1.0 if set_alpha_to_one else float(self.schedule.alpha_bar[0])

    def _alpha_bars(self, t: int, steps: int) -> tuple[float, float]:
        t_prev = t - self.schedule.n_train_steps // steps
        return self._alpha_bar(t, 1.0), self._alpha_bar(t_prev, self.final_alpha_bar)

    def _run(self, eps_model, noise, steps, start, x0, generator, step_done):
        ts = self.timesteps(steps)[start:]
        x = self._begin(noise, x0, ts)
        for i, t in enumerate(ts):
            alpha_bar, alpha_bar_prev = self._alpha_bars(int(t), steps)
            eps, x0_pred = self.predicted(x, eps_model(x, as_model_t(t, x)), alpha_bar)
            # σ_t = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1})   (eq. 16)
            sigma = self.eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)) ** 0.5
            x, x0_pred = ddim_step(x, eps, alpha_bar, alpha_bar_prev, sigma, x0_pred)
            if self.eta > 0:
                x = x + sigma * draw_noise(x, generator)  # + σ_t z
            x = step_done(i, t, x0_pred, x)
        return x

    @torch.no_grad()
    def invert(self, eps_model, x: torch.Tensor, steps: int) -> torch.Tensor:
        """DDIM inversion (η = 0 run backwards, Song et al. 2021 §4.3 / eq. 13): from the sampler's final state back to
        x_T, evaluating ε̂ at the current (less noisy) level. Exact as steps → ∞; `sample(invert(x))` ≈ x."""
        ts = self.timesteps(steps)
        for t in ts[::-1]:
            alpha_bar, alpha_bar_prev = self._alpha_bars(int(t), steps)
            t_prev = max(int(t) - self.schedule.n_train_steps // steps, 0)  # the timestep the state is at
            eps, x0_pred = self.predicted(x, eps_model(x, as_model_t(t_prev, x)), alpha_bar_prev)
            x, _ = ddim_step(x, eps, alpha_bar_prev, alpha_bar, x0_pred=x0_pred)  # the same update, levels swapped
        return x
