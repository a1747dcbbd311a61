"""The SD 2 ×4 upscaler (x4-upscaling.yaml): a latent diffusion model that draws a 4× larger version of a small
image, steered by a prompt.

    low-res image x_lr [B, 3, h, w] in [−1, 1] ──noised to level n──▶ x_lr' = √ᾱ_n·x_lr + √(1−ᾱ_n)·ε_lr
    z_t [B, 4, h, w] ──┬── cat(dim=1) ──▶ [B, 7, h, w] ──UNet(·, t, context, class_labels=n)──▶ v̂
              x_lr' ───┘
    z_0 ──÷ 0.08333──▶ VAE decoder (3 levels: ×4) ──▶ x [B, 3, 4h, 4w]

The latents have the low-res image's own size (its VAE downsamples 4×, not 8×), so every latent pixel sits on
one pixel of the low-res image, which the UNet reads as 3 more input channels. The output is 4h × 4w.

Noise augmentation (the conditioning augmentation of Ho et al. 2022, "Cascaded Diffusion Models for High Fidelity
Image Generation"): the model was trained on low-res images noised to a random level n < 350 and told n (a class
label, the UNet's label_emb). At inference a little noise (n = 20 by default) hides the low-res image's own flaws
(blur, JPEG blocks) so the model does not copy them; a larger n frees it to invent more detail and keep less of
the input. That schedule (the file's low_scale_model.* buffers) has β from 0.0001 to 0.02 over 1000 levels in
CompVis' "linear" form, β_n = linspace(√0.0001, √0.02, 1000)² (diffusers: "scaled_linear"), ᾱ_n = ∏_{s≤n}(1 − β_s).

Everything else is SD 2: v-prediction (the model's own β schedule has the same endpoints), OpenCLIP text, and
classifier-free guidance over [uncond; cond] with the same noised low-res image in both halves, as diffusers'
StableDiffusionUpscalePipeline batches it. Random numbers: image i's generator draws ε_lr first, then the
starting noise, then the sampler's per-step noise (diffusers' order; it draws one ε_lr for the whole batch,
we one per image, which is the same for a batch of one).
"""
from __future__ import annotations

from functools import partial

import torch

from .diffusion import Schedule, ScheduleConfig, xt_from_x0_eps
from .images import check_size, default_size, images_to_tensor, load_images
from .latents import NonFiniteOutputError
from .samplers.base import draw_noise
from .seeds import check_latents, make_generators, starting_noise

MAX_NOISE_LEVEL = 350   # x4-upscaling.yaml's max_noise_level (training drew n < 350; diffusers allows n ≤ 350)
NOISE_AUGMENTATION = ScheduleConfig(n_train_steps=1000, beta_start=0.0001, beta_end=0.02)   # noise_schedule_config


def check_upscaler_model(pipe) -> None:
    """The UNet must read a noise level (class embedding) and the low-res image (latent channels + 3)."""
    unet, z = pipe.config.unet, pipe.config.latent_channels
    if unet.num_classes is None or unet.in_channels != z + 3:
        raise ValueError(f"pipe.upscale needs the SD 2 ×4 upscaler (x4-upscaler-ema.safetensors or the diffusers "
                         f"folder stable-diffusion-x4-upscaler: a {z + 3}-channel UNet with a noise-level "
                         f"embedding); {pipe.config.name} is a {pipe.config.kind} model ({unet.in_channels} input "
                         "channels). Load the upscaler with ldm_scratch.load_pipeline(path) and call its .upscale; "
                         "with this model, pipe.img2img on an enlarged image is the nearest thing.")


def check_noise_level(noise_level) -> int:
    """n: a whole number in [0, 350] (the yaml's max_noise_level; the model never saw more)."""
    if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level <= MAX_NOISE_LEVEL:
        raise ValueError(f"noise_level must be a whole number in [0, {MAX_NOISE_LEVEL}] (the noise added to the "
                         f"low-res image; the model was trained up to {MAX_NOISE_LEVEL}, 20 is the usual), got "
                         f"{noise_level!r}")
    return int(noise_level)


def noise_low_res(x_lr: torch.Tensor, noise_level: int, generators) -> torch.Tensor:
    """x_lr [B, 3, h, w] in [−1, 1] → x_lr' = √ᾱ_n·x_lr + √(1−ᾱ_n)·ε_lr, ε_lr ~ N(0, I) from the generators
    (row i from generator i), ᾱ_n of the noise-augmentation schedule (module docstring)."""
    alpha_bar = float(Schedule(NOISE_AUGMENTATION).alpha_bar[noise_level])          # ᾱ_n (n = 20: 0.9973; 350: 0.64)
    eps = draw_noise(torch.empty_like(x_lr), generators)
    return xt_from_x0_eps(x_lr, eps, alpha_bar)                                      # √ᾱ_n x_lr + √(1−ᾱ_n) ε_lr


@torch.inference_mode()
def upscale(pipe, prompt=None, image=None, negative_prompt=None, *, noise_level: int = 20, num_images: int = 1,
            steps: int = 30, guidance_scale: float = 9.0, sampler="ddim", seed: int | None = None, generator=None,
            latents: torch.Tensor | None = None, output_type: str = "pil", callback=None, progress: bool = True,
            clip_skip: int | None = None, prompt_syntax: str = "a1111", prompt_embeds=None,
            negative_prompt_embeds=None):
    """Draw `image` 4× larger as `prompt` describes it. Returns what output_type asks for, as pipe.txt2img, at
    4h × 4w for an h × w image (h, w rounded down to a multiple of 4, diffusers' rule for this pipeline).

    image: a PIL image, a path, an array [h, w, 3] or a tensor [3, h, w] / [K, 3, h, w] in [0, 1], or a list
    (K = 1 or one per output image). noise_level n: how much noise the low-res image gets before the model sees
    it (module docstring), 0 … 350. guidance_scale 9 and DDIM are diffusers' defaults for this model (it runs 75
    steps). latents: the starting noise [B, 4, h, w]. Other arguments as pipe.txt2img.
    """
    check_upscaler_model(pipe)
    noise_level = check_noise_level(noise_level)
    if image is None:
        raise ValueError("pipe.upscale needs the low-resolution image: pipe.upscale(\"a photo of a cat\", image)")
    batch, sampler, encode = pipe._prepare(prompt, negative_prompt, num_images, steps, sampler, output_type,
                                           guidance_scale, None, (prompt_embeds, negative_prompt_embeds, clip_skip,
                                                                  prompt_syntax))
    images = load_images(image, "image")
    factor = pipe.config.vae.downsample_factor                                  # 4: latents at the image's size
    low_h, low_w = default_size(images[0], None, None, factor)
    height, width, h, w = check_size(low_h * factor, low_w * factor, factor)   # the output: 4× the input
    pipe._check_memory(batch, height, width)
    latents = check_latents(latents, (batch, pipe.config.latent_channels, h, w))
    x_lr = images_to_tensor(images, low_h, low_w, "image", batch)             # [K, 3, h, w] in [−1, 1]
    x_lr = x_lr.repeat(batch // x_lr.shape[0], 1, 1, 1)                       # [B, 3, h, w]

    generators = make_generators(batch, seed, generator)
    x_lr = noise_low_res(x_lr, noise_level, generators).to(pipe.device)        # 1. ε_lr
    noise = starting_noise(latents, (batch, pipe.config.latent_channels, h, w), generators, pipe.device)  # 2. ε
    contexts = encode()

    def step_done(i, t, x0_pred):                   # prompt editing ([a:b:0.5]) follows the sampler's steps
        contexts.step_done(i)
        if callback is not None:
            callback(i, t, x0_pred)
    # the model function of every task (guidance.py): UNet input cat(z_t, x_lr') [B, 7, h, w] (x_lr' in both CFG
    # halves), the noise level as the class label of every row
    unet = partial(pipe.unet, class_labels=noise_level)
    eps_model = pipe._eps_model(contexts, guidance_scale, extra=x_lr, unet=unet)
    result = sampler.sample(eps_model, noise, steps, generator=generators, callback=step_done, progress=progress)
    if not torch.isfinite(result).all():
        raise NonFiniteOutputError(f"the sampled latents contain NaN/inf (UNet in {pipe.dtype}); try "
                                   "dtype=torch.float32")
    return pipe._output(result, output_type)       # z_0 / 0.08333 → VAE decoder → [0, 1]


class UpscaleMethods:
    """`pipe.upscale`: the pipeline class inherits this thin method; the work is `upscale` above."""

    def upscale(self, prompt=None, image=None, negative_prompt=None, **options):
        """Upscale an image 4× with the SD 2 ×4 upscaler (ldm_scratch/upscale.py)."""
        return upscale(self, prompt, image, negative_prompt, **options)
