"""Latents ↔ images through the VAE: the latent scale, the posterior draws, and a half-precision fallback.

    images x [B, 3, H, W] in [−1, 1]  ──E──▶  z = latent_scale · (μ + σ·n)  [B, 4, H/f, W/f]        (encode_images)
    z  ──÷ latent_scale──▶  D  ──▶  x̂ [B, 3, H, W] in [−1, 1]                                         (decode_latents)

The latent scale: the VAE's latents have a standard deviation of ≈ 5.5 for SD v1, but the diffusion process (the β
schedule, the σ's, ε ~ N(0, I)) is built for data of unit variance, so the model diffuses z = latent_scale · E(x)
(0.18215 ≈ 1/5.5 for SD v1) and the decoder is given z / latent_scale. The VAE itself never sees the factor.

Precision: a float16 VAE can overflow (activations beyond 65,504 become inf: the "black image" users hit
elsewhere); `vae_call` redoes such a call in float32 and anything still non-finite raises NonFiniteOutputError.
"""
from __future__ import annotations

import warnings

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


class NonFiniteOutputError(FloatingPointError):
    """The sampled latents or the decoded image hold NaN/inf (instead of silently returning a black image)."""


def vae_call(vae, run, x: torch.Tensor, what: str, device):
    """run(x) with x cast to the VAE's device and dtype. If a half-precision result is non-finite, warn and run it
    again with the VAE temporarily in float32. The round trip half → float32 → half is exact, so the weights are
    unchanged afterwards."""
    dtype = next(vae.parameters()).dtype
    out = run(x.to(device, dtype))
    parts = [out] if isinstance(out, torch.Tensor) else [out.mean, out.std]  # an image, or a posterior
    if dtype not in HALF_DTYPES or all(torch.isfinite(part).all() for part in parts):
        return out
    warnings.warn(f"the VAE {what} overflowed in {dtype}; redoing it in float32", stacklevel=4)
    vae.float()
    try:
        return run(x.to(device, torch.float32))
    finally:
        vae.to(dtype)


def encode_images(vae, images: torch.Tensor, generators, batch: int, latent_scale: float, device) -> torch.Tensor:
    """images [K, 3, H, W] in [−1, 1] (K = 1 or `batch`) → scaled latents z = latent_scale · (μ + σ·n),
    [batch, 4, h, w]. One generator: one posterior draw over the K images, then repeated to the batch;
    one per image: image i's draw comes from generator i (diffusers' two cases)."""
    if isinstance(generators, torch.Generator):
        z = vae_call(vae, lambda x: vae.encode(x).sample(generators), images, "encode", device)
        z = z.repeat(batch // z.shape[0], 1, 1, 1)
    else:
        # encode each distinct image once, then draw image i's sample from generator i
        posteriors = [vae_call(vae, vae.encode, images[k:k + 1], "encode", device) for k in range(len(images))]
        z = torch.cat([posteriors[i % len(posteriors)].sample(g) for i, g in enumerate(generators)])
    if not torch.isfinite(z).all():
        raise NonFiniteOutputError("the VAE encoder gave NaN/inf even in float32: check the checkpoint")
    return latent_scale * z.float()  # z = latent_scale · E(x): unit variance for the diffusion process


def decode_latents(vae, latents: torch.Tensor, latent_scale: float, device) -> torch.Tensor:
    """Scaled latents [B, 4, h, w] → images [B, 3, 8h, 8w] in [−1, 1] (not clamped), float32."""
    x = vae_call(vae, vae.decode, latents / latent_scale, "decode", device)  # undo the scale: z / latent_scale
    if not torch.isfinite(x).all():
        raise NonFiniteOutputError("the VAE decoder gave NaN/inf even in float32: the latents are broken "
                                   f"(max |z| = {latents.abs().max().item():.3g}); check the checkpoint")
    return x.float()
