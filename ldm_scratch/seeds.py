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
  so a seed gives the same image on every device. `latents=` gives ε explicitly (a tensor, or a numpy array) and
  overrides the seed for it.

The pipeline (pipeline.py) makes these draws in this order; the posterior samples themselves are drawn by
`DiagonalGaussian.sample(generator)` in vae.py, through `StableDiffusion.encode_images`.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from .samplers.base import draw_noise

SEED_MAX = 2**64 - 1   # torch.Generator.manual_seed takes a 64-bit seed (it also wraps negatives, refused here)


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
    seed = random.randrange(2**32) if seed is None else check_seed(seed, batch)
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


def check_seed(seed, batch: int = 1) -> int:
    """A seed for a batch of `batch` images: an int with seed + batch − 1 ≤ 2**64 − 1 (image i uses seed + i)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int in 0 … 2**64 − 1, got {seed!r} ({type(seed).__name__})")
    if not 0 <= int(seed) <= SEED_MAX - (batch - 1):
        raise ValueError(f"seed must be an int in 0 … 2**64 − 1 (torch.Generator's range; image i of the batch "
                         f"uses seed + i, so here at most 2**64 − {batch}), got {seed!r}")
    return int(seed)


def starting_noise(latents, shape: tuple, generators, device: torch.device) -> torch.Tensor:
    """The starting noise ε ~ N(0, I) [B, 4, h, w], float32 on `device`: `latents` if given (checked), otherwise
    drawn on the generator's device (row i from generator i when there is one per image) and moved."""
    if latents is None:
        return draw_noise(torch.empty(shape, device=device), generators)
    return check_latents(latents, shape).to(device, torch.float32)


def check_latents(latents, shape: tuple):
    """None, or `latents` checked to be finite noise of `shape` [B, 4, h, w], as a tensor (the pipeline calls this
    before encoding any image, so a wrong shape fails before the VAE runs)."""
    if latents is None:
        return None
    if isinstance(latents, np.ndarray):                      # accepted: the same numbers as torch.from_numpy
        latents = torch.from_numpy(np.asarray(latents, dtype=np.float32))
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch tensor (or a numpy array) of shape {list(shape)}, got "
                        f"{type(latents).__name__}")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents must be a tensor of shape {list(shape)} (batch, {shape[1]}, height/8, "
                         f"width/8); got {list(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents hold NaN or inf; give finite noise, e.g. torch.randn(shape, generator=g)")
    return latents


def skip_draws(shape: tuple, generators) -> None:
    """Advance the generators past one draw of `shape` [K, …] (K images) without using the numbers: what a
    posterior sample of K images would have taken from them (one generator: the whole [K, …] at once; one per
    image: [1, …] from each)."""
    if isinstance(generators, torch.Generator):
        torch.randn(shape, generator=generators, device=generators.device)
    else:
        for g in generators:
            torch.randn((1, *shape[1:]), generator=g, device=g.device)
