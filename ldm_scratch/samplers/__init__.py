"""Samplers: turn noise into latents with an ε-predicting model. See `base.py` for the shared convention.

    sampler = get_sampler("dpmpp_2m", karras=True)
    latents = sampler.sample(eps_model, noise, steps=30, generator=torch.Generator().manual_seed(0))

Names and the diffusers scheduler each one reproduces (defaults = that scheduler built from SD v1.5's config):
    ddpm      DDPMScheduler                                   leading, offset 1, variance_type "fixed_small"
    ddim      DDIMScheduler                                   leading, offset 1, eta 0
    plms      CompVis PLMS (= pndm for leading spacing)       leading, offset 1
    pndm      PNDMScheduler(skip_prk_steps=True) — SD v1.5's default scheduler
    lms       LMSDiscreteScheduler                            linspace, karras False
    euler     EulerDiscreteScheduler                          linspace, karras False
    euler_a   EulerAncestralDiscreteScheduler                 linspace, karras False
    heun      HeunDiscreteScheduler                           linspace, karras False
    dpmpp_2m  DPMSolverMultistepScheduler(dpmsolver++, order 2)  linspace, karras False
    lcm       LCMScheduler (latent consistency models)        its own grid of original_steps = 50: steps 1 … 50

Step counts: 1 … T = 1000, less where a spacing's grid would leave the trained timesteps or repeat one (e.g. 999 for
"leading" with steps_offset 1); anything else is refused with a ValueError before the first model call, which names
the limit (`Sampler.check_steps`, and spaced_timesteps' docstring for where diffusers differs).
"""

import inspect

from .base import Denoiser, Sampler, karras_sigmas, spaced_timesteps
from .ddim import DDIM
from .ddpm import DDPM
from .dpmpp import DPMSolverPP2M
from .euler import Euler, EulerAncestral
from .heun import Heun
from .lcm import LCM
from .lms import LMS
from .plms import PLMS, PNDM

SAMPLERS = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "plms": PLMS,
    "pndm": PNDM,
    "lms": LMS,
    "euler": Euler,
    "euler_a": EulerAncestral,
    "heun": Heun,
    "dpmpp_2m": DPMSolverPP2M,
    "lcm": LCM,
}


def get_sampler(name: str, **options) -> Sampler:
    """A sampler by name, e.g. get_sampler("ddim", eta=0.0, timestep_spacing="trailing")."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")
    cls = SAMPLERS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {name!r} does not take option(s) {unknown}; it accepts {accepted}")
    return cls(**options)


__all__ = ["get_sampler", "SAMPLERS", "Sampler", "Denoiser", "spaced_timesteps", "karras_sigmas",
           "DDPM", "DDIM", "PLMS", "PNDM", "LMS", "Euler", "EulerAncestral", "Heun", "DPMSolverPP2M", "LCM"]
