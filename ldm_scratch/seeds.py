"""Seeds, generators and the order of the random draws: what makes a seed reproduce the same image.

- `seed=int`: image i of the batch gets its own `torch.Generator().manual_seed(seed + i)` (AUTOMATIC1111 records
  seed + i for image i), so a batch of N is the same as N single runs with seeds seed … seed + N − 1.
  `generator=[g_0, …]` does the same with your generators (one per image); `generator=g` draws the whole batch
  from one generator, as diffusers does with a single generator. No seed and no generator: a random seed.
- From each generator, in this order (diffusers' order, so the same seeds give diffusers' images):
    img2img:  the posterior sample of the init image, z = μ + σ·n; then the starting noise ε
    inpaint:  [the posterior sample of the image, if it is needed: regular model, or strength < 1]; the starting
              noise ε; the posterior sample of the masked image (the regular model does not use it, and we skip
              the encoder, but still draw its numbers, `skip_draws`, so the sampler's later draws line up with
              diffusers')
    txt2img:  the starting noise ε
  then whatever the sampler draws per step (ancestral samplers). With one generator each draw covers the batch.
- Noise is drawn in float32 on the generator's device (the CPU unless you pass a CUDA generator) and then moved,
  so a seed gives the same image on every device. `latents=` gives ε explicitly and overrides the seed for it.

The pipeline (pipeline.py) makes these draws in this order; the posterior samples themselves are drawn by
`DiagonalGaussian.sample(generator)` in vae.py, through `StableDiffusion.encode_images`.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from .samplers.base import draw_noise

def make_generators(batch: int, seed, generator) -> torch.Generator | list[torch.Generator]:
    """One torch.Generator for the whole batch, or a list with one per image (see the module docstring)."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch} images; pass one per "
                                 "image, or a single generator for the whole batch")
            return list(generator)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        return generator
    if seed is None:
        seed = random.randrange(2**32)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return [torch.Generator().manual_seed(int(seed) + i) for i in range(batch)]


def starting_noise(latents, shape: tuple, generators, device: torch.device) -> torch.Tensor:
    """The starting noise ε ~ N(0, I) [B, 4, h, w], float32 on `device`: `latents` if given (checked), otherwise
    drawn on the generator's device (row i from generator i when there is one per image) and moved."""
    if latents is None:
        return draw_noise(torch.empty(shape, device=device), generators)
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents must be a tensor of shape {list(shape)} (batch, {shape[1]}, height/8, "
                         f"width/8); got {list(getattr(latents, 'shape', [])) or type(latents).__name__}")
    return latents.to(device, torch.float32)


def skip_draws(shape: tuple, generators) -> None:
    """Advance the generators past one draw of `shape` [K, …] (K images) without using the numbers: what a
    posterior sample of K images would have taken from them (one generator: the whole [K, …] at once; one per
    image: [1, …] from each)."""
    if isinstance(generators, torch.Generator):
        torch.randn(shape, generator=generators, device=generators.device)
    else:
        for g in generators:
            torch.randn((1, *shape[1:]), generator=g, device=g.device)
