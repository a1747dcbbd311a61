"""Inversion: find the noise (and, with null-text, the unconditional embeddings) from which sampling gives back a
given real image, so that it can be edited like a generated one (prompt_to_prompt(..., inversion=inv)).

DDIM inversion (Song et al. 2021, §4.3; Mokady et al. 2022, eq. 3). DDIM with η = 0 is a discretised ODE, so it can
be run backwards: from z*_0 = latent_scale · E(x) (the posterior mean), one step up from level ᾱ_{t−1} to ᾱ_t is

    z*_t = √ᾱ_t · (z*_{t−1} − √(1−ᾱ_{t−1}) ε) / √ᾱ_{t−1} + √(1−ᾱ_t) · ε,        ε = ε_θ(z*_{t−1}, t_prev, c)

(the sampling step with the two levels swapped, ε taken at the less noisy point: the approximation that makes it
inexact for few steps). Unguided (w = 1) this retraces well. But editing needs guidance (w = 7.5), and guided
sampling from z*_T drifts away from the inversion's trajectory: the image comes back changed.

Null-text inversion (Mokady et al. 2022, §3.2, eq. 4 and Algorithm 1) keeps z*_T and the prompt, and instead tunes
the unconditional ("null-text") embedding ∅_t of each step so that the guided step lands on the trajectory:

    min_{∅_t} ‖ z*_{t−1} − DDIM_step(z̄_t, ε̃(z̄_t, t, c, ∅_t)) ‖²,     ε̃ = ε(∅_t) + w·(ε(c) − ε(∅_t))

a few Adam steps per t (10, learning rate 0.01·(1 − i/100), stopping early once the loss is < 1e-5 + i·2e-5), each
∅_t starting from ∅_{t+1}'s result, then z̄_{t−1} = that step with the tuned ∅_t. The image is reproduced up to the
VAE's own reconstruction error, and the conditional branch is untouched, so prompt edits still act.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..images import check_size, default_size, images_to_tensor, load_images
from ..samplers.ddim import ddim_step
from .denoise import (check_guidance, check_model, check_steps, ddim_plan, denoise, encode_text, guided_eps,
                      latents_to_output)

INNER_STEPS = 10          # Adam steps per timestep (Algorithm 1's N)
LEARNING_RATE = 1e-2      # at the first timestep, decayed linearly by 1 % per step as in the authors' code
EARLY_STOP = 1e-5         # stop a timestep's optimisation once ‖·‖² < 1e-5 + i · 2e-5


@dataclass
class Inversion:
    """What `invert` found. latents: z_T [1, 4, h, w] to start sampling from; prompt, steps, guidance_scale: how to
    sample from it; null_embeddings: None (plain DDIM inversion; the unconditional context is the empty prompt's)
    or one tuned ∅_t [1, 77, D] per step in sampling order; trajectory: z*_0 … z*_T of the DDIM inversion."""
    latents: torch.Tensor
    prompt: str
    steps: int
    guidance_scale: float
    null_embeddings: list[torch.Tensor] | None
    trajectory: list[torch.Tensor]

    def unconditional(self, pipe):
        """The unconditional context(s) to sample with: the per-step list, or the empty prompt's [1, 77, D]."""
        if self.null_embeddings is not None:
            return self.null_embeddings
        return encode_text(pipe, [""]) if self.guidance_scale != 1 else None


def invert(pipe, image, prompt: str, *, steps: int = 50, null_text: bool = False, guidance_scale: float = 7.5,
           inner_steps: int = INNER_STEPS, learning_rate: float = LEARNING_RATE, progress: bool = False) -> Inversion:
    """Invert a real image (PIL, path, array or tensor as img2img's init_image; its size must be a multiple of the
    VAE's factor) under `prompt`: DDIM inversion, and with null_text=True the per-step null-text embeddings for
    sampling at `guidance_scale` (module docstring). `regenerate(pipe, inv)` gives the image back.
    inner_steps, learning_rate: Adam steps per timestep and the first step's learning rate (Algorithm 1's N, and
    the authors' 0.01, decayed by 1 % a step, never below a tenth).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {prompt!r}")
    check_model(pipe)
    steps, guidance_scale = check_steps(steps), check_guidance(guidance_scale)
    images = load_images(image, "image")
    if len(images) != 1:
        raise ValueError(f"invert takes one image, got {len(images)}")
    factor = pipe.config.vae.downsample_factor
    height, width, _, _ = check_size(*default_size(images[0], None, None, factor), factor)
    x = images_to_tensor(images, height, width, "image", 1)                  # [1, 3, H, W] in [−1, 1]
    with torch.no_grad():
        z0 = pipe.latent_scale * pipe.vae.encode(x.to(pipe.device, pipe.vae_dtype)).mean.float()   # z*_0
    cond = encode_text(pipe, [prompt])
    trajectory = ddim_inversion(pipe, z0, cond, steps)
    nulls = None
    if null_text:
        nulls = null_text_optimisation(pipe, trajectory, cond, encode_text(pipe, [""]), steps, guidance_scale,
                                       inner_steps, learning_rate, progress)
    return Inversion(trajectory[-1], prompt, steps, guidance_scale, nulls, trajectory)


@torch.no_grad()
def ddim_inversion(pipe, z0: torch.Tensor, cond: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """[z*_0, z*_{t_1}, …, z*_T]: the DDIM steps run upwards, unguided (w = 1, as Mokady et al.)."""
    trajectory = [z0]
    z = z0
    for t, alpha_bar, alpha_bar_prev in reversed(ddim_plan(pipe, steps)):
        t_prev = max(t - pipe.schedule.n_train_steps // steps, 0)           # the level z is at now
        eps = guided_eps(pipe, z, t_prev, cond, None, 1.0)                   # ε = ε_θ(z*_{t−1}, t_prev, c)
        z, _ = ddim_step(z, eps, alpha_bar_prev, alpha_bar)                  # the sampling step, levels swapped
        trajectory.append(z)
    return trajectory


def null_text_optimisation(pipe, trajectory, cond, null, steps: int, guidance_scale: float, inner_steps: int,
                           learning_rate: float = LEARNING_RATE, progress: bool = False) -> list[torch.Tensor]:
    """One tuned ∅_t [1, 77, D] per step, in sampling order (Mokady et al. Algorithm 1; module docstring)."""
    frozen = [p for p in pipe.unet.parameters() if p.requires_grad]
    for p in frozen:               # gradients for ∅_t only: autograd then skips the weights' (half the work)
        p.requires_grad_(False)
    try:
        return _optimise(pipe, trajectory, cond, null, steps, guidance_scale, inner_steps, learning_rate, progress)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _optimise(pipe, trajectory, cond, null, steps, guidance_scale, inner_steps, learning_rate, progress):
    nulls = []
    z = trajectory[-1]                                                       # z̄_T = z*_T
    null = null.detach().clone()
    for i, (t, alpha_bar, alpha_bar_prev) in enumerate(ddim_plan(pipe, steps)):
        target = trajectory[-2 - i]                                          # z*_{t−1}
        with torch.no_grad():
            t_in = torch.tensor(float(t), device=z.device)
            eps_cond = pipe.unet(z.to(pipe.dtype), t_in, cond.to(pipe.dtype)).float()        # fixed: ε(z̄_t, c)
        null = null.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([null], lr=learning_rate * max(1 - i / 100, 0.1))
        for _ in range(inner_steps):
            with torch.enable_grad():
                eps_uncond = pipe.unet(z.to(pipe.dtype), t_in, null.to(pipe.dtype)).float()
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # ε̃ = ε(∅_t) + w·(ε(c) − ε(∅_t))
                z_prev, _ = ddim_step(z, eps, alpha_bar, alpha_bar_prev)
                loss = F.mse_loss(z_prev, target)                            # ‖z*_{t−1} − z_{t−1}(z̄_t, ∅_t)‖²
                (grad,) = torch.autograd.grad(loss, [null])
            null.grad = grad
            optimiser.step()
            if loss.item() < EARLY_STOP + i * 2e-5:
                break
        null = null.detach()
        nulls.append(null)
        with torch.no_grad():
            eps = guided_eps(pipe, z, t, cond, null, guidance_scale)
            z, _ = ddim_step(z, eps, alpha_bar, alpha_bar_prev)              # z̄_{t−1} with the tuned ∅_t
        if progress:
            print(f"null-text step {i + 1}/{steps}: loss {loss.item():.2e}", flush=True)
    return nulls


def regenerate(pipe, inversion: Inversion, output_type: str = "pil"):
    """Sample from an inversion with its own prompt, steps, guidance and (null-text) embeddings: gives the
    inverted image back (up to the VAE and, for plain DDIM inversion at w > 1, the drift explained above)."""
    cond = encode_text(pipe, [inversion.prompt])
    latents = denoise(pipe, inversion.latents.to(pipe.device), cond, inversion.unconditional(pipe),
                      inversion.steps, inversion.guidance_scale)
    return latents_to_output(pipe, latents, output_type)
