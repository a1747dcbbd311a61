"""The denoising loop that the editing methods share: deterministic DDIM with classifier-free guidance, one step at a
time, with a hook point before and after every step.

Editing needs what `pipe.txt2img` keeps inside: the step index while the UNet runs (prompt-to-prompt edits the
attention of the first steps only), the state after each step (local blending), and a different unconditional
embedding at every step (null-text inversion). So this is the loop written out, on the same pieces the pipeline
uses: the tokenizer and text encoder, the UNet, `samplers.ddim.ddim_step` on DDIM's timesteps (SD v1.5's defaults:
"leading" spacing, steps_offset 1), and `pipe.decode_latents`. With no edit it gives `pipe.txt2img(...,
sampler="ddim")`'s image (tests/test_editing.py).

DDIM, η = 0 (Song et al. 2021, eq. 12, with the paper's α_t written ᾱ_t):

    x̂₀ = (x_t − √(1−ᾱ_t) ε̃) / √ᾱ_t,      x_{t−1} = √ᾱ_{t−1} x̂₀ + √(1−ᾱ_{t−1}) ε̃

    ε̃ = ε_θ(x_t, t, ∅) + w·(ε_θ(x_t, t, c) − ε_θ(x_t, t, ∅))          classifier-free guidance, scale w
"""
from __future__ import annotations

import torch

from ..diffusion import classifier_free_guidance
from ..images import check_output_type, to_output
from ..samplers.ddim import DDIM, ddim_step


@torch.no_grad()   # not inference_mode: null-text inversion differentiates through the UNet with these
def encode_text(pipe, texts: list[str]) -> torch.Tensor:
    """Prompts → context [len(texts), 77, D], straight from the tokenizer and the text encoder (plain text: no
    prompt syntax, so token positions are exactly the tokenizer's)."""
    return pipe.text_encoder(pipe.tokenizer(texts).to(pipe.device)).float()


def prompt_tokens(pipe, prompt: str) -> list[tuple[int, str]]:
    """[(index, token)] of a prompt's tokens, index = the position in the 77-token sequence (BOS is 0, so the first
    word is 1), token = its text ("circle", or a piece of a longer word). Tokens past the 75 that fit are dropped."""
    ids = pipe.tokenizer.encode(prompt)[:75]
    return [(i + 1, pipe.tokenizer.decode([token_id]).strip()) for i, token_id in enumerate(ids)]


def ddim_plan(pipe, steps: int) -> list[tuple[int, float, float]]:
    """[(t, ᾱ_t, ᾱ_{t−1})] for each of the `steps` DDIM steps, in sampling order (t descending): the pipeline's
    own "ddim" sampler's timesteps and levels, so the two loops visit the same noise levels."""
    sampler = DDIM(pipe.schedule)
    return [(int(t), *sampler._alpha_bars(int(t), steps)) for t in sampler.timesteps(steps)]


def starting_noise(pipe, seed: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """ε ~ N(0, I) [1, 4, h, w] drawn on the CPU from torch.Generator().manual_seed(seed): the same noise
    `pipe.txt2img(seed=seed)` starts its first image from."""
    factor = pipe.config.vae.downsample_factor
    height, width = height or pipe.config.image_size, width or pipe.config.image_size
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}×{width}")
    shape = (1, pipe.config.latent_channels, height // factor, width // factor)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(pipe.device)


def guided_eps(pipe, x: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor | None,
               guidance_scale: float) -> torch.Tensor:
    """ε̃ for a batch x [B, 4, h, w] with contexts cond [B, 77, D] and uncond [B, 77, D] (None when w = 1).
    The UNet sees one batch [x; x] with contexts [uncond; cond], so an attention hook finds the unconditional
    rows first and the conditional rows last (B of each)."""
    t_in = torch.tensor(float(t), device=x.device)
    if uncond is None or guidance_scale == 1:
        return pipe.unet(x.to(pipe.dtype), t_in, cond.to(pipe.dtype)).float()
    eps = pipe.unet(torch.cat([x, x]).to(pipe.dtype), t_in, torch.cat([uncond, cond]).to(pipe.dtype)).float()
    eps_uncond, eps_cond = eps.chunk(2)
    return classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)  # ε̃ = ε(∅) + w·(ε(c) − ε(∅))


@torch.no_grad()
def denoise(pipe, x: torch.Tensor, cond: torch.Tensor, uncond, steps: int, guidance_scale: float,
            before_step=None, after_step=None) -> torch.Tensor:
    """Run the DDIM loop from x_T = x [B, 4, h, w] to x_0; returns the final latents.

    uncond: the unconditional context [B, 77, D], a list with one per step (null-text inversion), or None (w = 1).
    before_step(i): called before step i's UNet call (e.g. to tell an attention hook the step index).
    after_step(i, x) -> x: called with the state after step i; may return a changed state (local blending).
    """
    for i, (t, alpha_bar, alpha_bar_prev) in enumerate(ddim_plan(pipe, steps)):
        if before_step is not None:
            before_step(i)
        step_uncond = uncond[i] if isinstance(uncond, (list, tuple)) else uncond
        if step_uncond is not None and step_uncond.shape[0] != x.shape[0]:
            step_uncond = step_uncond.expand(x.shape[0], -1, -1)
        eps = guided_eps(pipe, x, t, cond, step_uncond, guidance_scale)
        x, _ = ddim_step(x, eps, alpha_bar, alpha_bar_prev)   # x_{t−1} = √ᾱ_{t−1} x̂₀ + √(1−ᾱ_{t−1}) ε̃
        if after_step is not None:
            x = after_step(i, x)
    return x


def latents_to_output(pipe, latents: torch.Tensor, output_type: str):
    """Scaled latents [B, 4, h, w] → images as `output_type` ("pil" list, "np", "pt" in [0, 1], or "latent")."""
    output_type = check_output_type(output_type)
    if output_type == "latent":
        return latents
    return to_output((pipe.decode_latents(latents) / 2 + 0.5).clamp(0, 1), output_type)   # [−1, 1] → [0, 1]


def check_model(pipe) -> None:
    """The loop above is written for a 4-channel ε-predicting UNet (SD v1, SD 2 base, the tiny model): refuse the
    others before any work, saying so."""
    prediction = getattr(pipe.schedule.config, "prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"editing supports ε-predicting models; this one predicts {prediction!r} (SD 2 768-v): "
                         "use an ε model such as SD v1.5 or SD 2 base")
    if pipe.config.unet.in_channels != pipe.config.latent_channels:
        raise ValueError(f"editing needs a plain {pipe.config.latent_channels}-channel UNet; this one takes "
                         f"{pipe.config.unet.in_channels} input channels (an inpainting or instruction model)")


def check_guidance(guidance_scale) -> float:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale < 1:
        raise ValueError(f"guidance_scale must be a number ≥ 1, got {guidance_scale!r}")
    return float(guidance_scale)


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 999:
        raise ValueError(f"steps must be an int in 1 … 999 (DDIM's leading spacing), got {steps!r}")
    return steps
