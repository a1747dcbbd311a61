"""The model function the samplers call: the UNet with classifier-free guidance and everything a task adds to it.

    eps_model(x_t, t) -> ε̂ [B, 4, h, w]          (samplers/base.py's convention; x_t [B, 4, h, w], t a 0-dim tensor)

One UNet call per sampler evaluation, on the batch [uncond; cond] (2B rows) when guiding:

    ε̂ = ε_θ(x_t, ∅) + s·(ε_θ(x_t, c) − ε_θ(x_t, ∅))          classifier-free guidance (eq 4.4), s = guidance_scale
    ε̂ ← φ·rescale(ε̂) + (1 − φ)·ε̂                             guidance rescale (Lin et al. 2023 §3.4), φ ≥ 0, if set

and what a task puts around that call:
- the context of the sampler's current step (prompt editing, conditioning.StepContexts),
- the inpainting model's extra channels [mask, masked-image latents] appended to x_t (9-channel UNet),
- ControlNets: `unet` may be a control.ControlledUNet, which has the UNet's signature,
- a full LCM UNet reads s itself (a guidance embedding, unet.py) and runs one pass without CFG.
"""
from __future__ import annotations

import torch

from .conditioning import StepContexts
from .diffusion import classifier_free_guidance, rescale_guidance


def model_function(unet, context, guidance_scale: float, *, dtype: torch.dtype, guided: bool,
                   extra: torch.Tensor | None = None, guidance_rescale: float = 0.0, guidance_input: bool = False):
    """eps_model(x, t) over `unet(x, t, context)`.

    context: [uncond; cond] [2B, 77·K, D] when `guided`, else [B, 77·K, D]; or a StepContexts, whose `current`
    context (that of the sampler's step) each call reads. extra: [B, 5, h, w] (mask + masked-image latents) or None.
    guidance_input: the UNet takes the guidance scale as an input (a full LCM UNet; then `guided` is False).
    The UNet runs in `dtype`; its output and the guidance arithmetic are float32.
    """
    if extra is not None and guided:
        extra = torch.cat([extra, extra])
    inputs = {"guidance": guidance_scale} if guidance_input else {}

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x, x]) if guided else x         # [uncond; cond] in one UNet call
        if extra is not None:                              # 9-channel: [x_t, mask, masked-image latents]
            x_in = torch.cat([x_in, extra], dim=1)
        step_context = context.current if isinstance(context, StepContexts) else context
        eps = unet(x_in.to(dtype), t, step_context, **inputs).float()
        if not guided:
            return eps
        eps_uncond, eps_cond = eps.chunk(2)
        eps = classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)        # eq 4.4
        return rescale_guidance(eps, eps_cond, guidance_rescale) if guidance_rescale else eps
    return eps_model
