"""InstructPix2Pix (Brooks et al., 2023): edit an image by a written instruction ("make the circle green").

The model is SD v1 whose UNet takes 8 input channels: the noisy latents z_t (4) and the latents of the image to
edit c_I (4), concatenated along the channels. The text is the instruction c_T, through CLIP as any prompt.

    image x [B, 3, H, W] ──VAE encoder, posterior MODE, NO latent scale──▶ c_I = E(x).mean [B, 4, h, w]
    z_t [B, 4, h, w] ─┬─ cat(dim=1) ─▶ [B, 8, h, w] ──UNet(·, t, context)──▶ ε
                c_I ──┘

(The training code of the paper encodes the image with `.mode()` and does not multiply by 0.18215: the model
learnt to read c_I at the VAE's own scale, so we must give it the same. The unconditional image is zeros.)

Guidance with two conditions (eq 3 of the paper), one UNet call over three batches:

    ε̃ = ε(∅,∅) + s_I·(ε(c_I,∅) − ε(∅,∅)) + s_T·(ε(c_I,c_T) − ε(c_I,∅))

s_I = image_guidance_scale (how closely to keep the image), s_T = guidance_scale (how strongly to follow the
text). The batch is ordered as diffusers' StableDiffusionInstructPix2PixPipeline orders it:

    row block:      0            1            2
    context:        c_T          ∅            ∅            (∅ = the negative prompt's context, default "")
    image latents:  c_I          c_I          0

so the blocks give ε(c_I,c_T), ε(c_I,∅), ε(∅,∅). With s_T = s_I = 1 the formula is ε(c_I,c_T) alone, and only
that one batch runs. (diffusers skips guidance whenever s_T ≤ 1 or s_I < 1; we apply the formula for any other
pair of scales, so such scales differ from diffusers, as pipeline.py's CFG does for s < 1.)

Starting point: the paper samples from pure noise z_T = ε, but training never shows the model pure noise: at
t = 999 of SD's schedule √ᾱ_t ≈ 0.07, so z_t still carries 7 % of the target's latents (the "signal leak" of
Lin et al. 2023). `strength` starts instead from the image's latents noised as in img2img,
z_t = √ᾱ_t·latent_scale·c_I + √(1−ᾱ_t)·ε: strength 1 runs every step and leaves that leak, taken from the image to
edit; smaller strengths keep more of the image and run fewer steps. None keeps the paper's start. (On the tiny
model trained here strength 1 kept less than pure noise: README, "A tiny InstructPix2Pix", round 4.)

Random numbers: the mode takes none, so a seed draws the starting noise ε and then the sampler's per-step noise
(seeds.py), as diffusers.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from .arguments import check_guidance_rescale, prepare
from .conditioning import StepContexts, step_contexts
from .diffusion import rescale_guidance
from .images import images_to_tensor, load_images
from .seeds import check_latents, make_generators, starting_noise


def check_instruct_model(pipe) -> None:
    """The UNet must take 2 × latent channels (latents + image latents): a regular 4-channel model or a
    9-channel inpainting model has never seen an image to edit."""
    z, n = pipe.config.latent_channels, pipe.config.unet.in_channels
    if n != 2 * z:
        what = "an inpainting model (9 channels: latents, mask, masked image)" if n == 2 * z + 1 else \
            f"a regular text-to-image model ({n} input channels)"
        raise ValueError(f"pipe.instruct needs an InstructPix2Pix checkpoint (a {2 * z}-channel UNet input: latents "
                         f"+ image latents, e.g. instruct-pix2pix-00-22000.safetensors); {pipe.config.name} is "
                         f"{what}. Use pipe.img2img to change an image with a regular model.")


def check_image_guidance(scale) -> float:
    """image_guidance_scale s_I: a finite number ≥ 0 (1 = no image guidance, 1.5 the paper's default)."""
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"image_guidance_scale must be a finite number ≥ 0 (s_I: 1 = no image guidance, 1.5 the "
                         f"paper's default, higher keeps closer to the image), got {scale!r}")
    return float(scale)


def image_latents(pipe, x: torch.Tensor, batch: int) -> torch.Tensor:
    """x [K, 3, H, W] in [−1, 1] (K = 1 or batch) → c_I = E(x).mode [batch, 4, h, w], float32, WITHOUT the latent
    scale (the reference's convention, module docstring)."""
    c = pipe._vae_call(lambda images: pipe.vae.encode(images).mode(), x, "encode").float()
    return c.repeat(batch // c.shape[0], 1, 1, 1)


def instruct_model_function(unet, contexts, c_image: torch.Tensor, text_scale: float, image_scale: float, *,
                            dtype: torch.dtype, guided: bool, guidance_rescale: float = 0.0):
    """eps_model(x, t) → ε̃ [B, 4, h, w] for the samplers.

    contexts: a StepContexts (or a tensor) holding [∅; c_T] [2B, 77·K, D] when `guided`, else c_T [B, 77·K, D].
    c_image: c_I [B, 4, h, w]. One UNet call over [3B, 8, h, w] when guided (row blocks: module docstring).
    guidance_rescale φ: ε̃ brought back toward the std of the fully conditioned ε(c_I,c_T) (Lin et al. 2023, as
    pipeline.py's CFG; diffusion.rescale_guidance); 0 = off, the paper's and diffusers' pipeline."""
    if guided:
        c_image = torch.cat([c_image, c_image, torch.zeros_like(c_image)])      # [c_I, c_I, 0]

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        context = contexts.current if isinstance(contexts, StepContexts) else contexts
        if not guided:
            return unet(torch.cat([x, c_image], dim=1).to(dtype), t, context).float()
        uncond, cond = context.chunk(2)
        x_in = torch.cat([torch.cat([x, x, x]), c_image], dim=1)                 # [3B, 8, h, w]
        eps = unet(x_in.to(dtype), t, torch.cat([cond, uncond, uncond])).float()  # contexts [c_T, ∅, ∅]
        eps_text, eps_image, eps_none = eps.chunk(3)          # ε(c_I,c_T), ε(c_I,∅), ε(∅,∅)
        # ε̃ = ε(∅,∅) + s_I·(ε(c_I,∅) − ε(∅,∅)) + s_T·(ε(c_I,c_T) − ε(c_I,∅))    (Brooks et al. 2023, eq 3)
        guided_eps = eps_none + image_scale * (eps_image - eps_none) + text_scale * (eps_text - eps_image)
        return rescale_guidance(guided_eps, eps_text, guidance_rescale) if guidance_rescale else guided_eps
    return eps_model


@torch.inference_mode()
def instruct(pipe, image=None, instruction=None, negative_prompt=None, *, image_guidance_scale: float = 1.5,
             guidance_scale: float = 7.5, num_images: int = 1, steps: int = 30, sampler="euler_a",
             seed: int | None = None, generator=None, latents: torch.Tensor | None = None,
             height: int | None = None, width: int | None = None, output_type: str = "pil", callback=None,
             progress: bool = True, clip_skip: int | None = None, prompt_syntax: str = "a1111",
             prompt_embeds=None, negative_prompt_embeds=None, guidance_rescale: float = 0.0,
             strength: float | None = None):
    """Edit `image` as `instruction` says. Returns what output_type asks for, as pipe.txt2img.

    image: as img2img's init_image (PIL, path, array, tensor [3, H, W] / [K, 3, H, W] in [0, 1], or a list; K = 1
    or one per output image); the output has its size (height/width: rounded down to a multiple of 8).
    instruction: a string or a list (batch), like a prompt; negative_prompt: the ∅ of the guidance (default "").
    image_guidance_scale s_I, guidance_scale s_T: the module docstring's equation. sampler: Euler ancestral by
    default, the paper's sampler (it uses 100 steps). guidance_rescale φ in [0, 1]: instruct_model_function (0 =
    the paper's). strength: None (the paper's) starts from pure noise; a number in (0, 1] starts, as img2img
    does, from the image's own latents latent_scale·c_I noised to the level of the first step that runs —
    strength 1 runs every step, and its only difference from None is the signal √ᾱ_t·latent_scale·c_I left at
    the first timestep (module docstring, "Starting point"). Other arguments as pipe.txt2img.
    """
    check_instruct_model(pipe)
    if image is None:
        raise ValueError("pipe.instruct needs the image to edit: pipe.instruct(image, \"make the circle green\")")
    image_guidance_scale = check_image_guidance(image_guidance_scale)
    check_guidance_rescale(guidance_rescale)
    prompts, negatives, batch, sampler = prepare(
        instruction, negative_prompt, num_images, steps, sampler, output_type, pipe.schedule, strength, guidance_scale,
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        text_width=pipe.config.text_encoder.width, prompt_syntax=prompt_syntax)
    images = load_images(image, "image")
    height, width, h, w = pipe._image_size(images[0], height, width)
    pipe._check_memory(batch, height, width)               # the decoder's peak (arguments.py)
    latents = check_latents(latents, (batch, pipe.config.latent_channels, h, w))
    x = images_to_tensor(images, height, width, "image", batch)                 # [K, 3, H, W] in [−1, 1]
    c_image = image_latents(pipe, x, batch)                                     # [B, 4, h, w], no scale
    generators = make_generators(batch, seed, generator)
    noise = starting_noise(latents, c_image.shape, generators, pipe.device)     # the only draw before sampling
    guided = (guidance_scale, image_guidance_scale) != (1, 1)
    contexts = step_contexts(pipe.tokenizer, pipe.text_encoder, prompts, negatives, prompt_embeds,
                             negative_prompt_embeds, num_images=num_images, guided=guided, clip_skip=clip_skip,
                             syntax=prompt_syntax, steps=steps, dtype=pipe.dtype)

    def step_done(i, t, x0_pred):                   # prompt editing ([a:b:0.5]) follows the sampler's steps
        contexts.step_done(i)
        if callback is not None:
            callback(i, t, x0_pred)
    c_image = c_image.to(pipe.device)
    eps_model = instruct_model_function(pipe.unet, contexts, c_image, float(guidance_scale),
                                        image_guidance_scale, dtype=pipe.dtype, guided=guided,
                                        guidance_rescale=guidance_rescale)
    x0 = None if strength is None else pipe.latent_scale * c_image              # z = latent_scale · E(x).mode
    result = sampler.sample(eps_model, noise, steps, generator=generators, callback=step_done, progress=progress,
                            x0=x0, strength=1.0 if strength is None else strength)
    if not torch.isfinite(result).all():
        from .pipeline import NonFiniteOutputError
        raise NonFiniteOutputError(f"the sampled latents contain NaN/inf (UNet in {pipe.dtype}); try "
                                   "dtype=torch.float32")
    return pipe._output(result, output_type)


class InstructMethods:
    """`pipe.instruct`: the pipeline class inherits this thin method; the work is `instruct` above."""

    def instruct(self, image=None, instruction=None, negative_prompt=None, **options):
        """Edit an image by an instruction with an InstructPix2Pix checkpoint (ldm_scratch/instruct.py)."""
        return instruct(self, image, instruction, negative_prompt, **options)
