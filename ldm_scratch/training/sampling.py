"""Sampling with the in-training networks: the periodic grids of a run, and `generate` for the tests.

The pipeline (pipeline.py) does the same for users — CPU-drawn noise from the seed, DPM-Solver++ 2M, classifier-free
guidance against ∅ = CLIP("") — and a test checks that both give the same pixels for the same seed.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..configs import ModelConfig
from ..data import caption, heldout_combinations
from ..diffusion import Schedule, classifier_free_guidance, rescale_guidance
from ..samplers import get_sampler
from .config import TrainConfig


@torch.no_grad()
def generate(text_encoder, unet, vae, tokenizer, config: ModelConfig, captions: list[str], *, seed: int = 0,
             guidance_scale: float = 7.5, steps: int = 30, sampler: str = "dpmpp_2m", schedule: Schedule | None = None,
             guidance_rescale: float = 0.0, **sampler_options) -> torch.Tensor:
    """Images for `captions` (one each): uint8 [B, 3, H, W]. Noise ε [B, 4, h, w] is drawn on the CPU from `seed`.

    Classifier-free guidance (eq 4.4): ε̂ = ε_θ(z_t, t, ∅) + guidance_scale · (ε_θ(z_t, t, c) − ε_θ(z_t, t, ∅)),
    then guidance rescale φ = `guidance_rescale` (Lin et al. 2023 §3.4; 0: none). `schedule` (default the
    config's) says what the network predicts (ε or v) and whether ᾱ_T = 0; `sampler_options` go to the sampler
    (e.g. timestep_spacing="trailing").
    """
    device = next(unet.parameters()).device
    n, side = len(captions), config.image_size // config.vae.downsample_factor
    context = text_encoder(tokenizer(captions).to(device))            # [B, 77, D]
    empty = text_encoder(tokenizer([""] * n).to(device))              # ∅ = CLIP("")
    both = torch.cat([empty, context])

    def eps_model(z_t, t):
        eps_uncond, eps_cond = unet(torch.cat([z_t, z_t]), t, both).chunk(2)
        guided = classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)
        return rescale_guidance(guided, eps_cond, guidance_rescale) if guidance_rescale else guided

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, config.latent_channels, side, side, generator=generator).to(device)
    schedule = schedule or config.schedule()
    z0 = get_sampler(sampler, schedule=schedule, **sampler_options).sample(eps_model, noise, steps, generator=generator)
    x = vae.decode(z0 / config.latent_scale)                          # z = z_0 / latent_scale
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # pixel = (x + 1)·127.5


def save_grid(images: torch.Tensor, rows: int, path: Path) -> None:
    """uint8 [rows·cols, 3, H, W] (row-major) → one PNG."""
    grid = torch.cat([torch.cat(list(row), dim=2) for row in images.split(images.shape[0] // rows)], dim=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


GRID_CAPTIONS = [caption("circle", "red", "blue"), caption("square", "yellow", "green"),
                 caption("triangle", "white", "purple"), caption("star", "blue", "white"),
                 caption("ring", "purple", "yellow")] + [caption(*c) for c in heldout_combinations()[:3]]


def sample_grid(text_encoder, unet, vae, tokenizer, cfg: TrainConfig, path: Path, n_seeds: int = 4,
                schedule: Schedule | None = None) -> None:
    """One row per GRID_CAPTIONS entry (the last three are held-out combinations), one column per seed.
    A zero-terminal-SNR `schedule` is sampled as Lin et al. recommend: DDIM from t = T ("trailing"), φ = 0.7."""
    zero_snr = schedule is not None and schedule.config.rescale_zero_terminal_snr
    options = dict(sampler="ddim", timestep_spacing="trailing", guidance_rescale=0.7) if zero_snr else {}
    was_training = [m.training for m in (text_encoder, unet)]
    text_encoder.eval(), unet.eval()
    columns = [generate(text_encoder, unet, vae, tokenizer, cfg.model, GRID_CAPTIONS, seed=s,
                        guidance_scale=cfg.guidance_scale, steps=cfg.sample_steps, schedule=schedule, **options)
               for s in range(n_seeds)]
    images = torch.stack(columns, dim=1).flatten(0, 1)  # [captions · seeds, 3, H, W], row-major
    save_grid(images, len(GRID_CAPTIONS), path)
    for module, mode in zip((text_encoder, unet), was_training):
        module.train(mode)
