"""The fixed training set: rendered once, tokenised once, and (for stage 2) encoded to latents once.

Rendering the captioned shapes and tokenising captions cost far more than a tiny model's step, so `train.py` does
both once, up front: images uint8 [N, 3, H, W] and ids [N, 77]. After stage 1 the frozen autoencoder's posterior
q(z|x) = N(μ, σ²) is computed once for every image; stage 2 then draws z = μ + σ·n per step without the encoder.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import ShapesDataset, caption
from ..vae import VAE


def render_training_set(n_images: int, size: int, seed: int,
                        extreme_backgrounds: bool = False) -> tuple[torch.Tensor, list[str]]:
    """The fixed training set: images uint8 [N, 3, size, size] and their captions (the "train" split, with the pure
    black / pure white backgrounds when asked)."""
    dataset = ShapesDataset("train", size=size, length=n_images, seed=seed, extreme_backgrounds=extreme_backgrounds)
    images = torch.empty(n_images, 3, size, size, dtype=torch.uint8)
    captions = []
    for i in range(n_images):
        image, combo = dataset.sample(i)
        images[i] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        captions.append(caption(*combo))
    return images, captions


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] → float [B, 3, H, W] in [−1, 1]: x = 2·pixel/255 − 1."""
    return images.float() / 127.5 - 1.0


def tokenize_all(tokenizer, captions: list[str]) -> torch.Tensor:
    """[N, 77] token ids; each distinct caption is tokenised once (the data set has only 140 of them)."""
    unique = sorted(set(captions))
    ids = dict(zip(unique, tokenizer(unique)))
    return torch.stack([ids[c] for c in captions])


@torch.no_grad()
def encode_training_set(vae: VAE, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior q(z|x) = N(μ, σ²) of every training image: (μ, σ), each [N, 4, h, w], on `device`."""
    moments = [vae.encode(to_model_range(batch).to(device)) for batch in images.split(256)]
    return torch.cat([p.mean for p in moments]), torch.cat([p.std for p in moments])


def latent_std(z_mean: torch.Tensor, z_std: torch.Tensor, seed: int) -> torch.Tensor:
    """std(z) over all latent numbers of the training set, z = μ + σ·n one posterior sample per image (what
    training sees), n drawn from `seed`. The latent scale is its inverse: the diffusion process assumes data of unit
    variance (SD v1: 1/5.49 = 0.18215)."""
    z = z_mean + z_std * torch.randn(z_mean.shape, generator=torch.Generator().manual_seed(seed))
    return z.std()
