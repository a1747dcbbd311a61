"""The Stable Diffusion pipeline: the three networks, the noise schedule and a sampler put together.

    prompt ──tokenizer──▶ ids [B, 77] ──CLIP──▶ context [B, 77, D]           (D = 768 for SD v1)
    noise ε [B, 4, h, w] ──sampler: UNet steps with CFG──▶ latents z_0 ──÷ latent_scale──▶ VAE decoder
        ──▶ x [B, 3, H, W]                                                    (h, w = H/8, W/8)

Three entry points share that loop:
- `txt2img`: start from pure noise.
- `img2img`: encode the init image, z = latent_scale · E(x), noise it to the level of the first step that runs
  (q(z_t | z_0) at `int(steps × strength)` steps before the end) and run only the remaining steps.
- `inpaint`: white mask pixels are repainted, black ones kept. A 9-channel checkpoint (sd-v1-5-inpainting) was
  trained to see [noisy latents (4), mask at latent size (1), latents of the masked image (4)] and fills the hole
  itself. A regular 4-channel checkpoint is steered by mask blending instead: after every step the kept region of
  the state is replaced by the original latents noised to the state's current level, so only the hole is generated.

Classifier-free guidance (eq 4.4): ε̂ = ε_θ(x_t, ∅) + s·(ε_θ(x_t, c) − ε_θ(x_t, ∅)); the unconditional (negative
prompt, default "") and conditional inputs go through the UNet as one batch [uncond, cond], as diffusers does;
guidance_scale = 1 needs only ε_θ(x_t, c), so the unconditional half is skipped. (diffusers skips it for every
s ≤ 1; we apply eq 4.4 for any s ≠ 1, so s < 1 differs from diffusers.)

Random numbers: a seed gives image i of a batch its own generator (seed + i), and each generator is drawn from in
diffusers' order (posterior samples, then the starting noise ε, then the sampler's per-step noise), so the same
seed gives the same image as diffusers, on any device. The order is written down in seeds.py.

Inputs are checked before any network runs: images and masks in images.py (which also turns the result into
`output_type`), prompts, counts, strength, guidance and the sampler in arguments.py, seeds and latents in
seeds.py; a size whose activations would not fit in memory is refused first (arguments.check_memory: the estimate,
the limit, and $LDM_SCRATCH_MAX_MEMORY_GB to raise it).

Precision: `dtype` sets the networks' dtype (float32 default; float16/bfloat16 on devices that run them). The
sampler's state stays float32 and is cast for each UNet call. A float16 VAE decode can overflow to inf (the
"black image" users hit elsewhere), so a non-finite decode is redone in float32; anything still non-finite raises
`NonFiniteOutputError` instead of returning a black image.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .arguments import check_device, check_memory, prepare, txt2img_size
from .checkpoint import CheckpointError, load_models
from .diffusion import classifier_free_guidance
from .fast import install
from .images import OUTPUT_TYPES  # noqa: F401  (kept importable from here, where it was defined before)
from .images import check_size, default_size, images_to_tensor, load_images, masks_to_tensor, to_output
from .seeds import check_latents, make_generators, skip_draws, starting_noise

# the tiny model trained here, shipped inside the package (package data) so every kind of install can generate
BUNDLED_MODEL = Path(__file__).resolve().parent / "bundled" / "tiny-shapes.safetensors"
HALF_DTYPES = (torch.float16, torch.bfloat16)


class NonFiniteOutputError(FloatingPointError):
    """The sampled latents or the decoded image hold NaN/inf (instead of silently returning a black image)."""


class StableDiffusion:
    """Holds the networks (`text_encoder`, `unet`, `vae`), the `tokenizer`, the `schedule` and the `config`.

    Build it with `load_pipeline(...)`; call `txt2img`, `img2img` or `inpaint`.
    """

    def __init__(self, text_encoder, unet, vae, config, tokenizer=None, tokenizer_path=None, device="cpu"):
        self.text_encoder, self.unet, self.vae, self.config = text_encoder, unet, vae, config
        self.device = torch.device(device)
        self._tokenizer_path = tokenizer_path
        self._tokenizer = tokenizer
        self.schedule = config.schedule()                      # β_t, ᾱ_t of the model's training
        # The latent scale. The VAE's latents have a standard deviation of ≈ 5.5 for SD v1, but the diffusion
        # process (β schedule, the σ's, ε ~ N(0, I)) is built for data of unit variance. So the model diffuses
        # z = latent_scale · E(x) (0.18215 ≈ 1/5.5 for SD v1, chosen from the data's std; the tiny model stores its
        # own), and the decoder is given z / latent_scale. The VAE itself never sees the factor.
        self.latent_scale = float(config.latent_scale)

    @property
    def tokenizer(self):
        """Loaded on first use: finding the vocabulary may need a one-time download (see tokenizer.py)."""
        if self._tokenizer is None:
            from .tokenizer import load_tokenizer
            self._tokenizer = load_tokenizer(self._tokenizer_path)
        return self._tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def is_inpainting_model(self) -> bool:
        """A 9-channel UNet: [latents, mask, masked-image latents] (sd-v1-5-inpainting)."""
        return self.config.unet.in_channels == 9

    def to(self, device=None, dtype: torch.dtype | None = None) -> "StableDiffusion":
        """Move (and/or cast) all three networks; returns self."""
        if device is not None:
            self.device = torch.device(device)
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device=self.device, dtype=dtype)
        return self

    # -- text ------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str], clip_skip: int | None = None) -> torch.Tensor:
        """Prompts → context [len(prompts), 77, D] (over-long prompts are cut, with the tokenizer's warning)."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids, clip_skip=clip_skip)

    def _context(self, prompts, negative_prompts, num_images, guidance_scale, clip_skip) -> torch.Tensor:
        """[uncond; cond] contexts [2B, 77, D] (or just cond [B, 77, D] when guidance_scale = 1), each prompt
        repeated for its num_images images (batch order: prompt 0's images, then prompt 1's, …, as diffusers)."""
        cond = self.encode_prompt(prompts, clip_skip).repeat_interleave(num_images, dim=0)
        if guidance_scale == 1:
            return cond
        uncond = self.encode_prompt(negative_prompts, clip_skip).repeat_interleave(num_images, dim=0)
        return torch.cat([uncond, cond])

    # -- latents ↔ images --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor, generators, batch: int) -> torch.Tensor:
        """images [K, 3, H, W] in [−1, 1] (K = 1 or `batch`) → scaled latents z = latent_scale · (μ + σ·n),
        [batch, 4, h, w]. One generator: one posterior draw over the K images, then repeated to the batch;
        one per image: image i's draw comes from generator i (diffusers' two cases)."""
        if isinstance(generators, torch.Generator):
            z = self._vae_call(lambda x: self.vae.encode(x).sample(generators), images, "encode")
            z = z.repeat(batch // z.shape[0], 1, 1, 1)
        else:
            # encode each distinct image once, then draw image i's sample from generator i
            posteriors = [self._vae_call(self.vae.encode, images[k:k + 1], "encode") for k in range(len(images))]
            z = torch.cat([posteriors[i % len(posteriors)].sample(g) for i, g in enumerate(generators)])
        if not torch.isfinite(z).all():
            raise NonFiniteOutputError("the VAE encoder gave NaN/inf even in float32: check the checkpoint")
        return self.latent_scale * z.float()  # z = latent_scale · E(x): unit variance for the diffusion process

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] → images [B, 3, 8h, 8w] in [−1, 1] (not clamped), float32."""
        x = self._vae_call(self.vae.decode, latents / self.latent_scale, "decode")  # undo the scale: z / latent_scale
        if not torch.isfinite(x).all():
            raise NonFiniteOutputError("the VAE decoder gave NaN/inf even in float32: the latents are broken "
                                       f"(max |z| = {latents.abs().max().item():.3g}); check the checkpoint")
        return x.float()

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _vae_call(self, run, x: torch.Tensor, what: str):
        """run(x) with x cast to the VAE's device and dtype. If a half-precision result is non-finite (activations
        beyond float16's 65,504 become inf: the "black image"), warn and run it again with the VAE temporarily in
        float32. The round trip half → float32 → half is exact, so the weights are unchanged afterwards."""
        dtype = self.vae_dtype
        out = run(x.to(self.device, dtype))
        parts = [out] if isinstance(out, torch.Tensor) else [out.mean, out.std]  # an image, or a posterior
        if dtype not in HALF_DTYPES or all(torch.isfinite(part).all() for part in parts):
            return out
        warnings.warn(f"the VAE {what} overflowed in {dtype}; redoing it in float32", stacklevel=3)
        self.vae.float()
        try:
            return run(x.to(self.device, torch.float32))
        finally:
            self.vae.to(dtype)

    # -- the shared sampling loop ------------------------------------------------------------------------------------
    def _eps_model(self, context: torch.Tensor, guidance_scale: float, extra: torch.Tensor | None = None):
        """The model function the samplers call: ε̂(x_t, t) with CFG, and the inpainting channels appended.
        context is [uncond; cond] [2B, 77, D] when guiding, else [B, 77, D]; extra [B, 5, h, w] or None."""
        guided = guidance_scale != 1
        dtype = self.dtype
        if extra is not None and guided:
            extra = torch.cat([extra, extra])

        def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = torch.cat([x, x]) if guided else x       # [uncond; cond] in one UNet call
            if extra is not None:                            # 9-channel: [x_t, mask, masked-image latents]
                x_in = torch.cat([x_in, extra], dim=1)
            eps = self.unet(x_in.to(dtype), t, context).float()
            if not guided:
                return eps
            eps_uncond, eps_cond = eps.chunk(2)
            return classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)  # eq 4.4
        return eps_model

    @torch.inference_mode()
    def _run(self, *, prompts, negative_prompts, num_images, steps, guidance_scale, sampler, generators, noise,
             x0=None, strength=1.0, after_step=None, extra=None, output_type, callback, progress, clip_skip):
        """Encode the prompts, run the sampler, check and decode. Returns what output_type asks for."""
        context = self._context(prompts, negative_prompts, num_images, guidance_scale, clip_skip).to(self.dtype)
        latents = sampler.sample(self._eps_model(context, guidance_scale, extra), noise, steps,
                                 generator=generators, callback=callback, x0=x0,
                                 strength=strength, after_step=after_step, progress=progress)
        if not torch.isfinite(latents).all():
            raise NonFiniteOutputError(
                f"the sampled latents contain NaN/inf (UNet in {self.dtype}): half precision overflowed or the "
                "checkpoint holds non-finite weights; try dtype=torch.float32 (or bfloat16)")
        return self._output(latents, output_type)

    def _output(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        return to_output((self.decode_latents(latents) / 2 + 0.5).clamp(0, 1), output_type)  # [−1, 1] → [0, 1]

    # -- arguments shared by the tasks (checks: arguments.py, images.py) ------------------------------------------
    def _prepare(self, prompt, negative_prompt, num_images, steps, sampler, output_type, guidance_scale,
                 strength=None):
        """(prompts, negative prompts, batch size B, sampler), checked; see arguments.prepare."""
        return prepare(prompt, negative_prompt, num_images, steps, sampler, output_type, self.schedule, strength,
                       guidance_scale)

    def _check_memory(self, batch: int, height: int, width: int) -> None:
        """Refuse a size whose activations cannot fit, before allocating them (arguments.check_memory)."""
        check_memory(self.config, batch, height, width, self.vae_dtype, self.device)

    def _image_size(self, image, height, width) -> tuple[int, int, int, int]:
        """(H, W, h, w) for an image-to-image task: height/width default to the image's (see images.py)."""
        factor = self.config.vae.downsample_factor
        return check_size(*default_size(image, height, width, factor), factor)

    def _refuse_inpainting_model(self, what: str) -> None:
        if self.is_inpainting_model:
            raise ValueError(f"this is an inpainting checkpoint (9-channel UNet, {self.config.name}); it cannot run "
                             f"{what}: use pipe.inpaint(prompt, image, mask_image), or load a regular checkpoint")

    # -- public entry points ---------------------------------------------------------------------------------------
    def txt2img(self, prompt, negative_prompt=None, *, num_images: int = 1, steps: int = 30,
                guidance_scale: float = 7.5, sampler="dpmpp_2m", seed: int | None = None, generator=None,
                latents: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
                output_type: str = "pil", callback=None, progress: bool = True, clip_skip: int | None = None):
        """Text → images. prompt: a string or a list (batch); num_images per prompt.

        Returns, for B = len(prompts) · num_images: "pil" a list of B PIL images; "np" float32 [B, H, W, 3] in
        [0, 1]; "pt" [B, 3, H, W] in [0, 1]; "latent" the final scaled latents [B, 4, H/8, W/8].
        latents: explicit starting noise ε ~ N(0, I) [B, 4, H/8, W/8] (a σ-sampler scales it by its first σ).
        callback(i, t, x0_pred): after every step, with the current x̂₀ (scaled latents).
        """
        self._refuse_inpainting_model("txt2img")
        prompts, negatives, batch, sampler = self._prepare(prompt, negative_prompt, num_images, steps, sampler,
                                                           output_type, guidance_scale)
        factor = self.config.vae.downsample_factor
        height, width, h, w = check_size(*txt2img_size(height, width, latents, self.config.image_size, factor),
                                         factor)
        self._check_memory(batch, height, width)
        generators = make_generators(batch, seed, generator)
        noise = starting_noise(latents, (batch, self.config.latent_channels, h, w), generators, self.device)
        return self._run(prompts=prompts, negative_prompts=negatives, num_images=num_images, steps=steps,
                         guidance_scale=guidance_scale, sampler=sampler, generators=generators, noise=noise,
                         output_type=output_type, callback=callback, progress=progress, clip_skip=clip_skip)

    def img2img(self, prompt, init_image, negative_prompt=None, *, strength: float = 0.75, num_images: int = 1,
                steps: int = 30, guidance_scale: float = 7.5, sampler="dpmpp_2m", seed: int | None = None,
                generator=None, latents: torch.Tensor | None = None, height: int | None = None,
                width: int | None = None, output_type: str = "pil", callback=None, progress: bool = True,
                clip_skip: int | None = None):
        """Image + text → images. Runs the last int(steps × strength) steps starting from the init image's latents
        noised to that level: strength 1 keeps nothing but the rough layout, small strengths change little.

        init_image: a PIL image, a file path, an array [H, W, 3] (uint8, or float in [0, 1]), a tensor [3, H, W] or
        [K, 3, H, W] in [0, 1], or a list of those (K = 1 or one per output image). Size: height/width default to
        the image's (rounded down to a multiple of 8); an image of another size with the same aspect ratio is
        resized (with a warning). Other arguments and the return value as `txt2img`.
        """
        self._refuse_inpainting_model("img2img")
        prompts, negatives, batch, sampler = self._prepare(prompt, negative_prompt, num_images, steps, sampler,
                                                           output_type, guidance_scale, strength)
        images = load_images(init_image, "init_image")
        height, width, h, w = self._image_size(images[0], height, width)
        self._check_memory(batch, height, width)
        latents = check_latents(latents, (batch, self.config.latent_channels, h, w))
        x = images_to_tensor(images, height, width, "init_image", batch)         # [K, 3, H, W] in [−1, 1]
        generators = make_generators(batch, seed, generator)
        x0 = self.encode_images(x, generators, batch)                           # drawn first
        noise = starting_noise(latents, x0.shape, generators, self.device)      # then ε
        return self._run(prompts=prompts, negative_prompts=negatives, num_images=num_images, steps=steps,
                         guidance_scale=guidance_scale, sampler=sampler, generators=generators, noise=noise, x0=x0,
                         strength=strength, output_type=output_type, callback=callback, progress=progress,
                         clip_skip=clip_skip)

    def inpaint(self, prompt, image, mask_image, negative_prompt=None, *, strength: float = 1.0,
                num_images: int = 1, steps: int = 30, guidance_scale: float = 7.5, sampler="dpmpp_2m",
                seed: int | None = None, generator=None, latents: torch.Tensor | None = None,
                height: int | None = None, width: int | None = None, output_type: str = "pil", callback=None,
                progress: bool = True, clip_skip: int | None = None):
        """Repaint the white part of `mask_image` (black is kept). A 9-channel checkpoint conditions on the mask and
        the masked image; a regular one is steered by mask blending (see the module docstring).

        image: as img2img's init_image. mask_image: a PIL image (converted to grayscale), a path, an array [H, W]
        or a tensor [1, H, W] / [K, 1, H, W] in [0, 1]; binarised at 0.5. strength < 1 starts from the image
        noised (as img2img) instead of pure noise. Other arguments and the return value as `txt2img`.
        """
        prompts, negatives, batch, sampler = self._prepare(prompt, negative_prompt, num_images, steps, sampler,
                                                           output_type, guidance_scale, strength)
        images, masks = load_images(image, "image"), load_images(mask_image, "mask_image")
        height, width, h, w = self._image_size(images[0], height, width)
        self._check_memory(batch, height, width)
        latents = check_latents(latents, (batch, self.config.latent_channels, h, w))
        x = images_to_tensor(images, height, width, "image", batch)              # [K, 3, H, W] in [−1, 1]
        mask = masks_to_tensor(masks, height, width, batch)                      # [K, 1, H, W], 0 keep / 1 repaint
        if mask.shape[0] != x.shape[0]:
            mask, x = mask.expand(batch, -1, -1, -1), x.expand(batch, -1, -1, -1)
        masked_image = x * (mask < 0.5)                                          # the kept pixels, hole = 0 (grey)
        # the mask at latent size: nearest-neighbour, as diffusers (each latent pixel takes one image pixel's value)
        mask_latent = F.interpolate(mask, size=(h, w)).to(self.device)
        mask_latent = mask_latent.repeat(batch // mask_latent.shape[0], 1, 1, 1)  # [B, 1, h, w]

        generators = make_generators(batch, seed, generator)                   # the draw order: seeds.py
        needs_image_latents = not self.is_inpainting_model or strength < 1.0
        x0 = self.encode_images(x, generators, batch) if needs_image_latents else None   # 1. image sample
        latent_shape = (batch, self.config.latent_channels, h, w)
        noise = starting_noise(latents, latent_shape, generators, self.device)         # 2. ε
        if self.is_inpainting_model:
            masked_latents = self.encode_images(masked_image, generators, batch)        # 3. masked-image sample
            extra, blend = torch.cat([mask_latent, masked_latents], dim=1), None        # [B, 1 + 4, h, w]
        else:
            skip_draws((masked_image.shape[0], *latent_shape[1:]), generators)          # 3. (numbers only)
            extra = None

            def blend(i: int, state: torch.Tensor) -> torch.Tensor:
                known = sampler.noise_to_level(x0, noise, i)  # the original latents at the state's noise level
                return (1 - mask_latent) * known + mask_latent * state  # keep where mask = 0, repaint where 1
        return self._run(prompts=prompts, negative_prompts=negatives, num_images=num_images, steps=steps,
                         guidance_scale=guidance_scale, sampler=sampler, generators=generators, noise=noise,
                         x0=x0 if strength < 1.0 else None, strength=strength, after_step=blend, extra=extra,
                         output_type=output_type, callback=callback, progress=progress, clip_skip=clip_skip)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def load_pipeline(path=None, *, use_ema: bool = False, dtype: torch.dtype | None = torch.float32,
                  device: str | torch.device = "cpu", tokenizer=None, fast: bool = True) -> StableDiffusion:
    """Load an official SD v1 single file, a diffusers folder, or (path=None) the bundled tiny model.

    dtype: the networks' dtype (default float32; None keeps the file's). tokenizer: None finds the vocabulary as
    `load_tokenizer` does (a diffusers folder's tokenizer/, else the user cache); or a path for `load_tokenizer`,
    or a tokenizer object.

    fast: put the networks on the fast path (`ldm_scratch.fast.install`): the UNet and the VAE in channels_last
    (10–18 % faster convolutions on CPU), the VAE's decoder in row bands at inference (a lower peak memory at
    large sizes), and the memory the conversion freed handed back to the OS. `pipe.vae.decode(z)` then runs banded
    too. fast=False leaves the networks as their classes build them (contiguous layout, plain vae.py layers), the
    code a reader follows. Both give the same images up to float32 rounding (channels_last convolutions add up in
    another order; the bands sum GroupNorm's statistics in two passes): on the bundled tiny model, max |fast −
    plain| over [0, 1] pixels was 2.8e-5 at 64² and 6.2e-5 at 128² (4 steps; tests/test_pipeline.py).
    """
    check_device(device)                              # before loading: cuda without CUDA fails here, clearly
    if path is None:
        path = BUNDLED_MODEL
        if not path.is_file():
            raise CheckpointError(f"the bundled model {path} is missing; pass the path of a checkpoint instead")
    loaded = load_models(path, use_ema=use_ema, dtype=dtype)
    tokenizer_path = loaded.tokenizer_path
    if isinstance(tokenizer, (str, Path, tuple, list)):
        tokenizer_path, tokenizer = tokenizer, None
    text_encoder, unet, vae = (m.to(device) for m in (loaded.text_encoder, loaded.unet, loaded.vae))
    if fast:
        install(text_encoder=text_encoder, unet=unet, vae=vae)
    return StableDiffusion(text_encoder, unet, vae, loaded.config, tokenizer=tokenizer,
                           tokenizer_path=tokenizer_path, device=device)
