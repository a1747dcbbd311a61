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

Random numbers — the draw order, which is what makes a seed reproducible:
- `seed=int`: image i of the batch gets its own `torch.Generator().manual_seed(seed + i)` (AUTOMATIC1111 records
  seed + i for image i), so a batch of N is the same as N single runs with seeds seed … seed + N − 1.
  `generator=[g_0, …]` does the same with your generators (one per image); `generator=g` draws the whole batch
  from one generator, as diffusers does with a single generator.
- From each generator, in this order (diffusers' order, so the same seeds give diffusers' images):
    img2img:  the posterior sample of the init image, z = μ + σ·n; then the starting noise ε
    inpaint:  [the posterior sample of the image, if it is needed: regular model, or strength < 1]; the starting
              noise ε; the posterior sample of the masked image (the regular model does not use it, and we skip
              the encoder, but still draw its numbers so the sampler's later draws line up with diffusers')
    txt2img:  the starting noise ε
  then whatever the sampler draws per step (ancestral samplers). With one generator each draw covers the batch.
- Noise is drawn in float32 on the generator's device (the CPU unless you pass a CUDA generator) and then moved,
  so a seed gives the same image on every device. `latents=` gives ε explicitly and overrides the seed for it.

Precision: `dtype` sets the networks' dtype (float32 default; float16/bfloat16 on devices that run them). The
sampler's state stays float32 and is cast for each UNet call. A float16 VAE decode can overflow to inf (the
"black image" users hit elsewhere), so a non-finite decode is redone in float32; anything still non-finite raises
`NonFiniteOutputError` instead of returning a black image.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .checkpoint import CheckpointError, load_models
from .diffusion import Schedule, ScheduleConfig, classifier_free_guidance
from .memory import release_freed_memory
from .samplers import Sampler, get_sampler
from .samplers.base import steps_to_run

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "weights" / "tiny-shapes.safetensors"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
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
        self.schedule = Schedule(ScheduleConfig(n_train_steps=config.num_train_timesteps,
                                                beta_start=config.beta_start, beta_end=config.beta_end))
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

    # -- random numbers --------------------------------------------------------------------------------------------
    def _generators(self, batch: int, seed, generator):
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
                raise TypeError("generator must be a torch.Generator or a list of them, got "
                                f"{type(generator).__name__}")
            return generator
        if seed is None:
            seed = random.randrange(2**32)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        return [torch.Generator().manual_seed(int(seed) + i) for i in range(batch)]

    def _randn(self, shape: tuple, generators) -> torch.Tensor:
        """N(0, I) of `shape` [B, …], float32, drawn on the generator's device and moved to ours; with one generator
        per image, row i comes from generator i."""
        if isinstance(generators, torch.Generator):
            return torch.randn(shape, generator=generators, device=generators.device).to(self.device)
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device).to(self.device) for g in generators]
        return torch.cat(rows)

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
        images = (self.decode_latents(latents) / 2 + 0.5).clamp(0, 1)  # [−1, 1] → [0, 1]
        if output_type == "pt":
            return images.cpu()
        array = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)  # [B, H, W, 3]
        if output_type == "np":
            return array
        return [Image.fromarray(image) for image in (array * 255).round().astype(np.uint8)]

    # -- argument checks -------------------------------------------------------------------------------------------
    def _prepare(self, prompt, negative_prompt, num_images, steps, sampler, output_type, strength=None):
        prompts = _as_prompt_list(prompt, "prompt")
        if negative_prompt is None:
            negative_prompts = [""] * len(prompts)
        else:
            negative_prompts = _as_prompt_list(negative_prompt, "negative_prompt")
            if len(negative_prompts) == 1:
                negative_prompts = negative_prompts * len(prompts)
            if len(negative_prompts) != len(prompts):
                raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts; give one, "
                                 "or one per prompt")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if strength is not None:
            if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
                raise ValueError(f"strength must be in [0, 1] (0 keeps the image, 1 replaces it), got {strength!r}")
            steps_to_run(steps, strength, img2img=True)  # also: steps × strength must leave at least one step
        else:
            steps_to_run(steps, 1.0, img2img=False)
        if isinstance(sampler, str):
            sampler = get_sampler(sampler, schedule=self.schedule)
        elif not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a name (see ldm_scratch.samplers.SAMPLERS) or a Sampler, got "
                            f"{type(sampler).__name__}")
        return prompts, negative_prompts, len(prompts) * num_images, sampler

    def _check_size(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(H, W, h, w): image and latent size, checked to be multiples of the VAE's factor (8)."""
        factor = self.config.vae.downsample_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < factor or value % factor:
                hint = f"e.g. {max(factor, value - value % factor)}" if isinstance(value, int) else "e.g. 512"
                raise ValueError(f"{name} must be a positive multiple of {factor} (the VAE's downsampling factor: "
                                 f"latents are {factor}× smaller), got {value!r}; {hint}")
        return int(height), int(width), int(height) // factor, int(width) // factor

    def _noise(self, latents, shape, generators) -> torch.Tensor:
        """The starting noise ε [B, 4, h, w]: `latents` if given (checked), otherwise drawn."""
        if latents is None:
            return self._randn(shape, generators)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must be a tensor of shape {list(shape)} (batch, {shape[1]}, height/8, "
                             f"width/8); got {list(getattr(latents, 'shape', [])) or type(latents).__name__}")
        return latents.to(self.device, torch.float32)

    def _size(self, height, width, latents) -> tuple[int, int]:
        """Default size: the latents' (if given), else the model's native resolution."""
        factor = self.config.vae.downsample_factor
        if latents is not None and isinstance(latents, torch.Tensor) and latents.dim() == 4:
            height = latents.shape[2] * factor if height is None else height
            width = latents.shape[3] * factor if width is None else width
        return (self.config.image_size if height is None else height,
                self.config.image_size if width is None else width)

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
                                                           output_type)
        _, _, h, w = self._check_size(*self._size(height, width, latents))
        generators = self._generators(batch, seed, generator)
        noise = self._noise(latents, (batch, self.config.latent_channels, h, w), generators)
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
                                                           output_type, strength)
        images = load_images(init_image, "init_image")
        height, width = _default_size(images[0], height, width, self.config.vae.downsample_factor)
        height, width, h, w = self._check_size(height, width)
        x = _images_to_tensor(images, height, width, "init_image", batch)        # [K, 3, H, W] in [−1, 1]
        generators = self._generators(batch, seed, generator)
        x0 = self.encode_images(x, generators, batch)                           # drawn first
        noise = self._noise(latents, x0.shape, generators)                      # then ε
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
                                                           output_type, strength)
        images, masks = load_images(image, "image"), load_images(mask_image, "mask_image")
        factor = self.config.vae.downsample_factor
        height, width = _default_size(images[0], height, width, factor)
        height, width, h, w = self._check_size(height, width)
        x = _images_to_tensor(images, height, width, "image", batch)             # [K, 3, H, W] in [−1, 1]
        mask = _masks_to_tensor(masks, height, width, batch)                     # [K, 1, H, W], 0 keep / 1 repaint
        if mask.shape[0] != x.shape[0]:
            mask, x = mask.expand(batch, -1, -1, -1), x.expand(batch, -1, -1, -1)
        masked_image = x * (mask < 0.5)                                          # the kept pixels, hole = 0 (grey)
        # the mask at latent size: nearest-neighbour, as diffusers (each latent pixel takes one image pixel's value)
        mask_latent = F.interpolate(mask, size=(h, w)).to(self.device)
        mask_latent = mask_latent.repeat(batch // mask_latent.shape[0], 1, 1, 1)  # [B, 1, h, w]

        generators = self._generators(batch, seed, generator)
        needs_image_latents = not self.is_inpainting_model or strength < 1.0
        x0 = self.encode_images(x, generators, batch) if needs_image_latents else None   # 1. image sample
        noise = self._noise(latents, (batch, self.config.latent_channels, h, w), generators)  # 2. ε
        if self.is_inpainting_model:
            masked_latents = self.encode_images(masked_image, generators, batch)        # 3. masked-image sample
            extra, blend = torch.cat([mask_latent, masked_latents], dim=1), None        # [B, 1 + 4, h, w]
        else:
            self._skip_posterior_draws(masked_image.shape[0], (h, w), generators)       # 3. (numbers only)
            extra = None

            def blend(i: int, state: torch.Tensor) -> torch.Tensor:
                known = sampler.noise_to_level(x0, noise, i)  # the original latents at the state's noise level
                return (1 - mask_latent) * known + mask_latent * state  # keep where mask = 0, repaint where 1
        return self._run(prompts=prompts, negative_prompts=negatives, num_images=num_images, steps=steps,
                         guidance_scale=guidance_scale, sampler=sampler, generators=generators, noise=noise,
                         x0=x0 if strength < 1.0 else None, strength=strength, after_step=blend, extra=extra,
                         output_type=output_type, callback=callback, progress=progress, clip_skip=clip_skip)

    def _skip_posterior_draws(self, n_images: int, latent_size: tuple[int, int], generators) -> None:
        """Advance the generators past the masked image's posterior sample without running the encoder."""
        shape = (self.config.latent_channels, *latent_size)
        if isinstance(generators, torch.Generator):
            torch.randn((n_images, *shape), generator=generators, device=generators.device)
        else:
            for g in generators:
                torch.randn((1, *shape), generator=g, device=g.device)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: prompts, images and masks
# ---------------------------------------------------------------------------------------------------------------

def _as_prompt_list(prompt, what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        if not prompt:
            raise ValueError(f"{what} is an empty list; give at least one prompt (a string, or a list of strings)")
        return list(prompt)
    raise TypeError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}")


def load_images(images, what: str) -> list:
    """One image or a list → a list of PIL images / arrays / tensors; file paths are opened (with a clear error)."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError(f"{what} is an empty list; give an image")
    out = []
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() == 4:
            out.extend(item)
        elif isinstance(item, (str, Path)):
            out.append(_open_image(Path(item), what))
        elif isinstance(item, (Image.Image, np.ndarray, torch.Tensor)):
            out.append(item)
        else:
            raise TypeError(f"{what}: expected a PIL image, a file path, a numpy array or a tensor, got "
                            f"{type(item).__name__}")
    return out


def _open_image(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{what}: cannot read {path} as an image ({error}); give a PNG or JPEG file") from error


def _size_of(image) -> tuple[int, int]:
    """(height, width) of a PIL image, an array [H, W(, C)] or a tensor [(C,) H, W]."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        return image.shape[0], image.shape[1]
    return tuple(image.shape[-2:])


def _default_size(image, height, width, factor: int) -> tuple[int, int]:
    """height/width default to the image's, rounded down to a multiple of `factor` (diffusers' rule)."""
    image_h, image_w = _size_of(image)
    return (image_h - image_h % factor if height is None else height,
            image_w - image_w % factor if width is None else width)


def _check_aspect(size: tuple[int, int], height: int, width: int, what: str) -> bool:
    """True if the image must be resized; raises if resizing would distort it (aspect ratios differ by more than
    the rounding to a multiple of 8 explains: scaled to the target height, its width is off by > 8 pixels)."""
    image_h, image_w = size
    if (image_h, image_w) == (height, width):
        return False
    if abs(image_w * height / image_h - width) > 8:
        raise ValueError(f"{what} is {image_w}×{image_h} (width×height) but the output is {width}×{height}: their "
                         f"aspect ratios differ ({image_w / image_h:.3f} vs {width / height:.3f}), so resizing would "
                         "distort it. Crop it to the output's aspect ratio, or pass height/width that match it.")
    warnings.warn(f"{what} is {image_w}×{image_h}; resizing it to {width}×{height}", stacklevel=4)
    return True


def _to_float_array(image, channels: int, what: str) -> np.ndarray:
    """An array or tensor image → float32 [H, W, channels] in [0, 1]."""
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if isinstance(image, torch.Tensor) and array.ndim == 3:
        array = array.transpose(1, 2, 0)                    # tensors are channels-first
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what}: expected an image [H, W], [H, W, 3] (array) or [3, H, W] (tensor), got shape "
                         f"{list(getattr(image, 'shape', []))}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = array.astype(np.float32)[..., :3]
    if channels == 1 and array.shape[-1] == 3:
        array = array @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]  # ITU-R 601 luma, as PIL's "L"
    elif channels == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.min() < 0 or array.max() > 1:
        raise ValueError(f"{what}: float pixel values must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]")
    return array


def _stack(images, height, width, mode: str, what: str, batch: int) -> torch.Tensor:
    """PIL/array/tensor images → [K, C, H, W] in [0, 1], resized to (height, width) when needed.

    Resizing as diffusers' VaeImageProcessor: PIL images with Lanczos, arrays and tensors with nearest-neighbour.
    """
    if len(images) not in (1, batch):
        raise ValueError(f"{what}: got {len(images)} images for a batch of {batch}; give one, or one per image")
    channels = 3 if mode == "RGB" else 1
    out = []
    for image in images:
        resize = _check_aspect(_size_of(image), height, width, what)
        if isinstance(image, Image.Image):
            image = image.convert(mode)
            if resize:
                image = image.resize((width, height), resample=Image.LANCZOS)
            array = np.asarray(image, dtype=np.float32).reshape(height, width, channels) / 255.0
            out.append(torch.from_numpy(array).permute(2, 0, 1))
        else:
            tensor = torch.from_numpy(_to_float_array(image, channels, what)).permute(2, 0, 1)
            out.append(F.interpolate(tensor[None], size=(height, width))[0] if resize else tensor)
    return torch.stack(out)


def _images_to_tensor(images, height, width, what, batch) -> torch.Tensor:
    """Images → [K, 3, H, W] in [−1, 1], the VAE's input range."""
    return _stack(images, height, width, "RGB", what, batch) * 2 - 1  # [0, 1] → [−1, 1]


def _masks_to_tensor(masks, height, width, batch) -> torch.Tensor:
    """Masks → [K, 1, H, W] of 0 (keep) and 1 (repaint), binarised at 0.5 as diffusers."""
    mask = _stack(masks, height, width, "L", "mask_image", batch)
    return (mask >= 0.5).float()


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def load_pipeline(path=None, *, use_ema: bool = False, dtype: torch.dtype | None = torch.float32,
                  device: str | torch.device = "cpu", tokenizer=None) -> StableDiffusion:
    """Load an official SD v1 single file, a diffusers folder, or (path=None) the bundled tiny model.

    dtype: the networks' dtype (default float32; None keeps the file's). tokenizer: None finds the vocabulary as
    `load_tokenizer` does (a diffusers folder's tokenizer/, else the user cache); or a path for `load_tokenizer`,
    or a tokenizer object.
    """
    if path is None:
        path = BUNDLED_MODEL
        if not path.is_file():
            raise CheckpointError(f"the bundled model {path} is missing; pass the path of a checkpoint instead")
    loaded = load_models(path, use_ema=use_ema, dtype=dtype)
    tokenizer_path = loaded.tokenizer_path
    if isinstance(tokenizer, (str, Path, tuple, list)):
        tokenizer_path, tokenizer = tokenizer, None
    # channels_last stores activations as [B, h, w, C]: 10–18 % faster convolutions on CPU (scripts/benchmark.py)
    # and the SpatialTransformer's [B, C, h, w] → [B, h·w, C] token view becomes free. Same numbers, other layout.
    unet, vae = [m.to(device, memory_format=torch.channels_last) for m in (loaded.unet, loaded.vae)]
    release_freed_memory()  # the weights' copies left behind by that conversion
    return StableDiffusion(loaded.text_encoder.to(device), unet, vae, loaded.config, tokenizer=tokenizer,
                           tokenizer_path=tokenizer_path, device=device)
