"""LCM — Luo, Tan, Huang, Li & Zhao 2023, "Latent Consistency Models: Synthesizing High-Resolution Images with
Few-Step Inference" (arXiv:2310.04378), sampled with the multistep algorithm of Song, Dhariwal, Chen & Sutskever
2023, "Consistency Models" (arXiv:2303.01469, Algorithm 1).

A consistency function f(x_t, t) maps every point of one probability-flow ODE trajectory to the trajectory's start
x_0. LCM builds it from the (distilled) network's x̂₀ with the boundary-condition scalings of Consistency Models
(§3, "Parameterization"; LCM eq. 9), which force f(x, 0) = x:

    f(x_t, t) = c_skip(t) · x_t + c_out(t) · x̂₀(x_t, t)
    c_skip(t) = σ_d² / ((s·t)² + σ_d²)          σ_d = 0.5 (the data's std, as in Consistency Models)
    c_out(t)  = s·t / √((s·t)² + σ_d²)          s = timestep_scaling = 10

With s = 10 the skip term is tiny at every timestep LCM visits (c_skip(19) = 6.9e-6, c_skip(259) = 3.7e-8): f is
x̂₀ but for the last few units of t, where it bends to x_t so that f(x, 0) = x holds exactly.

Multistep sampling (Algorithm 1): jump to x_0, then back up to the next, lower level with fresh noise, and repeat:

    x̂₀ᶜᵐ = f(x_{τ_i}, τ_i);   x_{τ_{i+1}} = √ᾱ_{τ_{i+1}} · x̂₀ᶜᵐ + √(1 − ᾱ_{τ_{i+1}}) · z,  z ~ N(0, I)

and the last step returns x̂₀ᶜᵐ itself (no noise). So every step but the last draws one `torch.randn` of the state's
shape, after its model call (base.draw_noise: diffusers' order and device), and the sampler is stochastic even at a
fixed start: a seed fixes the image.

Timesteps, as diffusers' LCMScheduler: the model was distilled on a skipping-step grid of N' = original_steps
(LCM's "N", 50 for the public SD 1.5 LCMs) timesteps k = T // N' apart (the paper's skipping step k = 20),

    τ' = k − 1, 2k − 1, …, N'k − 1            (19, 39, …, 999: a "trailing" grid of N' points)

and `steps` of them are taken evenly by index from the top, τ_i = τ'_(N'−1−⌊i·N'/steps⌋): 4 steps → 999, 759, 499,
259. img2img (diffusers' LatentConsistencyModelImg2ImgPipeline, not the generic rule in base.py): the grid is cut at
int(N'·strength)·k − 1 and all `steps` steps run on it, from x0 noised to its first timestep.

Guidance: LCM-LoRA is run without classifier-free guidance (guidance_scale 1, one model call per step); a full LCM
UNet takes the guidance scale as an input instead (unet.py, `guidance_embedding`). The sampler sees neither.
"""

import numpy as np
import torch

from ..diffusion import Schedule
from .base import AlphaBarSampler, as_model_t, draw_noise, too_many_steps

SIGMA_DATA = 0.5  # σ_d in c_skip / c_out (Consistency Models §3; diffusers hard-codes it too)


def consistency_scalings(t: float, timestep_scaling: float = 10.0) -> tuple[float, float]:
    """(c_skip(t), c_out(t)) of the consistency function f = c_skip·x_t + c_out·x̂₀ (LCM eq. 9); c_skip(0) = 1, c_out(0)
    = 0 (the boundary condition f(x, 0) = x)."""
    scaled = timestep_scaling * t  # s·t: without it c_skip(19) would be 6.9e-4, a hundred times more x_t
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)  # σ_d² / ((s t)² + σ_d²)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5  # s t / √((s t)² + σ_d²)
    return c_skip, c_out


class LCM(AlphaBarSampler):
    """The LCM multistep sampler. Options: original_steps N' (the distillation grid, LCMScheduler's
    `original_inference_steps`) and timestep_scaling s. Defaults = diffusers' LCMScheduler (and the official
    LCM / LCM-LoRA scheduler configs): N' = 50, s = 10."""

    def __init__(self, schedule: Schedule | None = None, *, original_steps: int = 50, timestep_scaling: float = 10.0):
        # LCM has its own spacing (the docstring); "trailing" / offset 0 only fill in the base class's fields
        super().__init__(schedule, timestep_spacing="trailing", steps_offset=0)
        n_train = self.schedule.n_train_steps
        if isinstance(original_steps, bool) or not isinstance(original_steps, int) \
                or not 1 <= original_steps <= n_train:
            raise ValueError(f"original_steps must be an int in 1 … {n_train} (the distillation grid; 50 for the "
                             f"public LCMs), got {original_steps!r}")
        self.original_steps, self.timestep_scaling = original_steps, timestep_scaling
        self._strength = 1.0  # img2img's strength during a sample() call; it shortens the grid

    def timesteps(self, steps: int, strength: float = 1.0) -> np.ndarray:
        """The `steps` timesteps visited, descending (`[steps]`, int64); raises ValueError for a count the grid
        cannot give, naming the largest that works."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        n_train = self.schedule.n_train_steps
        if steps > n_train:
            raise ValueError(f"steps={steps} {too_many_steps(n_train)}")
        k = n_train // self.original_steps  # the skipping step
        grid = np.arange(1, int(self.original_steps * strength) + 1)[::-1] * k - 1  # τ' = N'k − 1, …, 2k − 1, k − 1
        if steps > len(grid):
            what = f"{self.original_steps} × strength {strength:g} = {len(grid)}" if strength != 1 else f"{len(grid)}"
            raise ValueError(f"steps={steps}: LCM takes its steps from its distillation grid of original_steps = "
                             f"{what} timesteps; use steps ≤ {len(grid)} (LCM is made for 2–8)")
        # ⌊i·N'/steps⌋ written as diffusers computes it (floor of a float linspace), so the indices agree exactly
        index = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
        return grid[index]

    def step_plan(self, steps: int) -> np.ndarray:
        return self.timesteps(steps, self._strength)

    def sample(self, eps_model, noise, steps, *, x0=None, strength: float = 1.0, **options) -> torch.Tensor:
        """As Sampler.sample; with x0 (img2img), `strength` shortens the grid and every step runs (module
        docstring), so the base class sees strength 1."""
        if x0 is not None and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        self._strength = strength if x0 is not None else 1.0
        try:
            return super().sample(eps_model, noise, steps, x0=x0, strength=1.0, **options)
        finally:
            self._strength = 1.0

    def _run(self, eps_model, noise, steps, start, x0, generator, step_done):
        ts = self.timesteps(steps, self._strength)
        x = self._begin(noise, x0, ts)
        for i, t in enumerate(ts):
            alpha_bar = float(self.schedule.alpha_bar[t])
            _, x0_pred = self.predicted(x, eps_model(x, as_model_t(t, x)), alpha_bar)  # x̂₀ from ε̂ (or v̂)
            c_skip, c_out = consistency_scalings(float(t), self.timestep_scaling)
            denoised = c_skip * x + c_out * x0_pred  # f(x_τ, τ) = c_skip x_τ + c_out x̂₀
            if i + 1 < len(ts):  # back up to the next level: x_τ' = √ᾱ_τ' f + √(1 − ᾱ_τ') z
                x = self._noised(denoised, draw_noise(denoised, generator), self._levels[i + 1])
            else:
                x = denoised  # the last step ends on the trajectory's start
            x = step_done(i, t, denoised, x)
        return x
