"""Tiny random Stable Diffusion models for fast tests.

The networks keep SD v1's topology (4 levels, 2 ResBlocks per level, attention at the first three UNet levels) with
small widths, so their tensors have exactly the official SD v1 key names and only the shapes differ.
"""
import math

import torch

from ldm_scratch.clip import CLIPTextConfig, CLIPTextModel
from ldm_scratch.configs import ModelConfig
from ldm_scratch.unet import UNet, UNetConfig
from ldm_scratch.vae import VAE, VAEConfig


def tiny_config(in_channels: int = 4) -> ModelConfig:
    return ModelConfig(
        text_encoder=CLIPTextConfig(width=32, n_layers=2, n_heads=2, mlp_width=64),
        unet=UNetConfig(in_channels=in_channels, model_channels=32, channel_mult=(1, 2, 2, 2), n_heads=2,
                        context_dim=32),
        vae=VAEConfig(base_channels=32, channel_mult=(1, 2, 4, 4)),
        image_size=64, kind="tiny", name="tiny-test")


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give EVERY parameter a non-trivial random value: the original UNet zero-initialises its output layers,
    which would let a parity test pass without comparing anything."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if p.dim() > 1:
            p.copy_(noise / math.sqrt(p[0].numel()))        # ~ unit-variance activations
        elif name.endswith("weight"):
            p.copy_(1 + 0.1 * noise)                          # norm gains near 1
        else:
            p.copy_(0.1 * noise)
    return module


def random_networks(config: ModelConfig, seed: int = 0):
    """(text_encoder, unet, vae) with random weights, in eval mode."""
    return (randomize(CLIPTextModel(config.text_encoder), seed).eval(),
            randomize(UNet(config.unet), seed + 1).eval(),
            randomize(VAE(config.vae), seed + 2).eval())
