"""PLMS — pseudo linear multistep, Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on
Manifolds" (PNDM, arXiv:2202.09778).

PNDM splits a step into a *gradient part* (an estimate ε' of the noise over the step) and a *transfer part* φ that
moves x_t to x_{t−δ} along the DDIM curve given ε' (eq. 11):

    x_{t−δ} = φ(x_t, ε', t, t−δ) = √(ᾱ_{t−δ}/ᾱ_t) x_t − (ᾱ_{t−δ} − ᾱ_t) ε' / (ᾱ_t √(1−ᾱ_{t−δ}) + √(ᾱ_t (1−ᾱ_t) ᾱ_{t−δ}))

which is algebraically DDIM's η = 0 step. The gradient part is the 4th-order Adams–Bashforth combination of the
last four ε̂'s (eq. 12),

    ε' = (55 ε_t − 59 ε_{t+δ} + 37 ε_{t+2δ} − 9 ε_{t+3δ}) / 24,

with lower orders (2nd, 3rd Adams–Bashforth) while fewer ε̂'s exist. The very first step has none: PNDM uses
pseudo Runge–Kutta there; Stable Diffusion's samplers use a cheaper *pseudo improved Euler* (Heun) step instead —
one extra model call, ε' = (ε̂(x_t, t) + ε̂(x̃_{t−δ}, t−δ)) / 2 with x̃ the Euler (DDIM) prediction.

Two versions, identical for SD v1.5's default "leading" spacing (a test checks this):
- `PLMS`: CompVis' `ldm/models/diffusion/plms.py` — previous timestep = the next one in the list.
- `PNDM`: diffusers' `PNDMScheduler(skip_prk_steps=True)`, SD v1.5's default scheduler — it runs steps + 1 model
  calls over the list [t_0, t_1, t_1, t_2, …], always steps back by T // steps (for "linspace"/"trailing" that is
  not the next timestep in the list), and, for img2img, enters the list part-way as diffusers does.
Defaults = SD v1.5: spacing "leading", steps_offset 1, final level ᾱ_0 (set_alpha_to_one=False).

v-prediction: `PLMS` turns each v̂ into ε̂ at the level of the call that made it, as CompVis' SD 2 code does
(ε̂ = √(1−ᾱ) x + √ᾱ v̂); `PNDM` combines the raw v̂'s and converts the combination at the level the transfer starts
from, as diffusers does. For ε-models the two agree; for v-models they differ (measured 0.065 relative after
20 steps; tests/test_sd2_samplers.py).
"""

import numpy as np
import torch

from ..diffusion import Schedule
from .base import AlphaBarSampler, as_model_t
from .ddim import ddim_step


def adams_bashforth(eps: torch.Tensor, old_eps: list[torch.Tensor]) -> torch.Tensor:
    """ε' from the newest ε̂ and up to three older ones (newest last), PNDM eq. (12) and its lower orders."""
    if len(old_eps) == 1:
        return (3 * eps - old_eps[-1]) / 2  # 2nd order
    if len(old_eps) == 2:
        return (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12  # 3rd order
    return (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24  # 4th order


def transfer(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_prev: float) -> torch.Tensor:
    """The transfer part φ (PNDM eq. 11), written as in the paper."""
    x_coef = (alpha_bar_prev / alpha_bar) ** 0.5  # √(ᾱ_{t−δ}/ᾱ_t)
    denom = alpha_bar * (1 - alpha_bar_prev) ** 0.5 + (alpha_bar * (1 - alpha_bar) * alpha_bar_prev) ** 0.5
    return x_coef * x - (alpha_bar_prev - alpha_bar) * eps / denom


class PLMS(AlphaBarSampler):
    """CompVis PLMS. Each step: one model call (two on the first step), ε' by Adams–Bashforth, then the DDIM step."""

    def __init__(self, schedule: Schedule | None = None, *, timestep_spacing: str = "leading", steps_offset: int = 1,
                 set_alpha_to_one: bool = False):
        super().__init__(schedule, timestep_spacing=timestep_spacing, steps_offset=steps_offset)
        self.final_alpha_bar = 1.0 if set_alpha_to_one else float(self.schedule.alpha_bar[0])

    def _run(self, eps_model, noise, steps, start, x0, generator, step_done):
        ts = [int(t) for t in self.timesteps(steps)[start:]]
        t_prevs = ts[1:] + [-1]  # -1: the final level
        x = self._begin(noise, x0, ts)
        old_eps: list[torch.Tensor] = []
        for i, (t, t_prev) in enumerate(zip(ts, t_prevs)):
            alpha_bar, alpha_bar_prev = self._alpha_bar(t, 1.0), self._alpha_bar(t_prev, self.final_alpha_bar)
            eps = self.predicted(x, eps_model(x, as_model_t(t, x)), alpha_bar)[0]  # ε̂ (from v̂ for a v-model)
            if not old_eps:  # pseudo improved Euler: average ε̂ at both ends of an Euler (DDIM) step
                x_euler, _ = ddim_step(x, eps, alpha_bar, alpha_bar_prev)
                t_end = max(t_prev, 0)
                eps_end = self.predicted(x_euler, eps_model(x_euler, as_model_t(t_end, x)),
                                         float(self.schedule.alpha_bar[t_end]))[0]
                eps_prime = (eps + eps_end) / 2
            else:
                eps_prime = adams_bashforth(eps, old_eps)
            x, x0_pred = ddim_step(x, eps_prime, alpha_bar, alpha_bar_prev)  # transfer φ (eq. 11) = DDIM step
            old_eps = (old_eps + [eps])[-3:]
            x = step_done(i, t, x0_pred, x)
        return x


class PNDM(PLMS):
    """diffusers' PNDMScheduler(skip_prk_steps=True): the same method, bookkept over the list [t_0, t_1, t_1, t_2, …]
    of steps + 1 entries (one model call and one callback each). Entry 0 takes an Euler step and remembers x_{t_0};
    entry 1 redoes that step from x_{t_0} with the averaged ε̂ (pseudo improved Euler); then Adams–Bashforth."""

    def timesteps(self, steps: int) -> np.ndarray:
        """[t_0, t_1, t_1, t_2, …, t_{N−1}] (`[steps + 1]`; `[1]` for one step)."""
        t = super().timesteps(steps)
        return np.concatenate([t[:1], t[1:2], t[1:]])

    def _run(self, eps_model, noise, steps, start, x0, generator, step_done):
        ts = [int(t) for t in self.timesteps(steps)[start:]]
        delta = self.schedule.n_train_steps // steps  # diffusers always steps back by T // steps
        x = self._begin(noise, x0, ts)
        old_eps: list[torch.Tensor] = []
        x_start = None
        for i, t in enumerate(ts):
            eps = eps_model(x, as_model_t(t, x))
            t_from, t_to = t, t - delta
            if i == 0:  # Euler step, remembering where it started
                eps_prime, x_start = eps, x
                old_eps = [eps]
            elif i == 1:  # redo step 0 from x_{t_0} with ε' = (ε̂_{t_0} + ε̂(x̃_{t_1}, t_1)) / 2
                eps_prime, x = (eps + old_eps[-1]) / 2, x_start
                t_from, t_to = t + delta, t
            else:
                eps_prime = adams_bashforth(eps, old_eps)
                old_eps = (old_eps + [eps])[-3:]
            alpha_bar, alpha_bar_prev = self._alpha_bar(t_from, 1.0), self._alpha_bar(t_to, self.final_alpha_bar)
            # diffusers combines the raw outputs and only then reads ε' (and x̂₀, for the callback) off the
            # combination, at the level the transfer starts from; for ε-models that is the same thing
            eps_prime, x0_pred = self.predicted(x, eps_prime, alpha_bar)
            x = transfer(x, eps_prime, alpha_bar, alpha_bar_prev)
            x = step_done(i, t, x0_pred, x)
        return x
