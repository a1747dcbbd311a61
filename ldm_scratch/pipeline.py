"""The Stable Diffusion pipeline: the three networks, the noise schedule and a sampler put together.

    prompt ──prompts.py──▶ k chunks of 77 ids ──CLIP, weights (conditioning.py)──▶ context [B, 77·k, D]  (D = 768)
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

from pathlib import Path

import torch
import torch.nn.functional as F

from .arguments import (check_count, check_guidance_rescale, check_memory, check_prompt_syntax, prepare,
                        prompt_inputs, txt2img_size)
from .conditioning import StepContexts, step_contexts
from .control import ControlledUNet, prepare_controls
from .fast.deepcache import fast_unet
from .guidance import model_function
from .images import OUTPUT_TYPES  # noqa: F401  (kept importable from here, where it was defined before)
from .images import check_size, default_size, images_to_tensor, load_images, masks_to_tensor, to_output
from .instruct import InstructMethods
from .latents import NonFiniteOutputError, decode_latents, encode_images, vae_call
from .lora import LoraMethods
from .textual_inversion import TextualInversionMethods
from .upscale import UpscaleMethods
from .samplers.base import steps_to_run
from .seeds import check_latents, make_generators, skip_draws, starting_noise

# the tiny model trained here, shipped inside the package (package data) so every kind of install can generate
BUNDLED_MODEL = Path(__file__).resolve().parent / "bundled" / "tiny-shapes.safetensors"


class StableDiffusion(LoraMethods, TextualInversionMethods, InstructMethods, UpscaleMethods):  # + load_lora, set_lora_scale,
    # unload_lora (lora.py), load_textual_inversion, unload_textual_inversion (textual_inversion.py), instruct (instruct.py),
    # upscale (upscale.py)
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
            if self.config.tokenizer_pad_id is not None:        # SD 2's OpenCLIP tokenizer pads with id 0
                self._tokenizer.pad_id = self.config.tokenizer_pad_id
        return self._tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def is_inpainting_model(self) -> bool:
        """A 9-channel UNet: [latents, mask, masked-image latents] (sd-v1-5-inpainting)."""
        return self.config.unet.in_channels == 9

    def uses_cfg(self, guidance_scale: float) -> bool:
        """CFG (two UNet halves) unless s = 1 or the UNet takes s as an input (a full LCM UNet: unet.py)."""
        return guidance_scale != 1 and self.config.unet.guidance_embed_dim is None

    def to(self, device=None, dtype: torch.dtype | None = None) -> "StableDiffusion":
        """Move (and/or cast) all three networks; returns self."""
        if device is not None:
            self.device = torch.device(device)
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device=self.device, dtype=dtype)
        return self

    # -- text ------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(self, prompt, negative_prompt=None, clip_skip: int | None = None, prompt_syntax: str = "a1111",
                      *, steps: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt(s) → (context, negative_context), each [P, 77·K, D] (K chunks; both padded to the same K with
        empty-prompt chunks: conditioning.py). negative_prompt None means "" (the unconditional context).

        prompt_syntax "a1111": weights, BREAK, prompts beyond 75 tokens (prompts.py); "plain": literal text cut
        at 75 tokens. A prompt with editing or alternation ([a:b:0.5], [a|b]) gives the context of step 0 of a
        `steps`-step run; the pipeline itself follows the schedule step by step. Pass the results to txt2img /
        img2img / inpaint as prompt_embeds= and negative_prompt_embeds= (e.g. after editing them).
        clip_skip: diffusers' count (the web UI's "Clip skip: 2" is 1), see clip.py."""
        prompts, negatives, _ = prompt_inputs(prompt, negative_prompt, None, None, None)
        contexts = self._conditioning(prompts, negatives, None, None, 1, 7.5, clip_skip,  # s ≠ 1: both sides
                                      check_prompt_syntax(prompt_syntax), check_count(steps, "steps"))
        negative_context, context = contexts.at(0).chunk(2)        # [uncond; cond]
        return context, negative_context

    def _conditioning(self, prompts, negatives, prompt_embeds, negative_embeds, num_images, guidance_scale,
                      clip_skip, prompt_syntax, steps) -> StepContexts:
        """The per-step contexts of a call (conditioning.step_contexts): [uncond; cond] [2B, 77·K, D], or just
        cond [B, 77·K, D] when guidance_scale = 1; prompt i's rows repeated for its num_images images (batch
        order: prompt 0's images, then prompt 1's, …, as diffusers)."""
        return step_contexts(self.tokenizer, self.text_encoder, prompts, negatives,
                             prompt_embeds, negative_embeds, num_images=num_images, guided=self.uses_cfg(guidance_scale),
                             clip_skip=clip_skip, syntax=prompt_syntax, steps=steps, dtype=self.dtype)

    # -- latents ↔ images (latents.py) -------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor, generators, batch: int) -> torch.Tensor:
        """images [K, 3, H, W] in [−1, 1] (K = 1 or `batch`) → scaled latents latent_scale · E(x) [batch, 4, h, w]
        (one posterior draw per image, from its generator: latents.encode_images)."""
        return encode_images(self.vae, images, generators, batch, self.latent_scale, self.device)

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] → images [B, 3, 8h, 8w] in [−1, 1] (not clamped), float32."""
        return decode_latents(self.vae, latents, self.latent_scale, self.device)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _vae_call(self, run, x: torch.Tensor, what: str):
        """run(x) on the VAE, redone in float32 if half precision overflowed (latents.vae_call)."""
        return vae_call(self.vae, run, x, what, self.device)

    # -- the shared sampling loop ------------------------------------------------------------------------------------
    def _eps_model(self, context, guidance_scale: float, extra: torch.Tensor | None = None, unet=None,
                   guidance_rescale: float = 0.0):
        """The model function the samplers call (guidance.py): ε̂(x_t, t) with CFG (eq 4.4) on one UNet call over
        [uncond; cond], the inpainting channels appended. unet: default self.unet; with ControlNets a
        control.ControlledUNet."""
        return model_function(unet or self.unet, context, guidance_scale, dtype=self.dtype, extra=extra,
                              guided=self.uses_cfg(guidance_scale), guidance_rescale=guidance_rescale,
                              guidance_input=self.config.unet.guidance_embed_dim is not None)

    @torch.inference_mode()
    def _run(self, *, encode, steps, guidance_scale, sampler, generators, noise, x0=None, strength=1.0,
             after_step=None, extra=None, output_type, callback, progress, controls=(), guess_mode=False,
             guidance_rescale=0.0, fast=(None, 0, None)):
        """Encode the prompts (encode() → StepContexts), run the sampler, check and decode. Returns what
        output_type asks for. The contexts advance from the sampler's per-step hook: editing switches on time."""
        unet, callback = fast_unet(self.unet, *fast, callback=callback)   # DeepCache / ToMe (fast/), if asked
        contexts = encode()
        if controls:   # ControlNets add their residuals in the UNet call; their window counts the steps that run
            unet = ControlledUNet(unet, controls, guess_mode=guess_mode, guided=self.uses_cfg(guidance_scale),
                                  n_steps=steps - steps_to_run(steps, strength, img2img=x0 is not None))
            callback = unet.counting(callback)

        def step_done(i, t, x0_pred):                      # after step i the model calls belong to step i + 1
            contexts.step_done(i)
            if callback is not None:
                callback(i, t, x0_pred)
        eps_model = self._eps_model(contexts, guidance_scale, extra, unet, guidance_rescale)
        latents = sampler.sample(eps_model, noise, steps,
                                 generator=generators, callback=step_done, x0=x0,
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
    def _prepare(self, prompt, negative_prompt, num_images, steps, sampler, output_type, guidance_scale, strength,
                 text):
        """(batch size B, sampler, encode), checked (arguments.prepare); encode() gives the StepContexts later,
        after the images are checked. text: (prompt_embeds, negative_prompt_embeds, clip_skip, prompt_syntax)."""
        embeds, negative_embeds, clip_skip, syntax = text
        prompts, negatives, batch, sampler = prepare(
            prompt, negative_prompt, num_images, steps, sampler, output_type, self.schedule, strength, guidance_scale,
            prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, text_width=self.config.text_encoder.width,
            prompt_syntax=syntax)
        return batch, sampler, lambda: self._conditioning(prompts, negatives, embeds, negative_embeds, num_images,
                                                          guidance_scale, clip_skip, syntax, steps)

    def _control(self, controlnet, control_image, scale, start, end, guess_mode, guidance_rescale, height, width,
                 batch) -> dict:
        """The ControlNets (control.prepare_controls: checked, hints loaded at the output size) and the guidance
        options, as _run's keyword arguments."""
        check_guidance_rescale(guidance_rescale)
        controls = prepare_controls(controlnet, control_image, self.config.unet, scale=scale, start=start, end=end,
                                    height=height, width=width, batch=batch, device=self.device)
        return dict(controls=controls, guess_mode=guess_mode, guidance_rescale=guidance_rescale)

    def _check_memory(self, batch: int, height: int, width: int) -> None:
        """Refuse a size whose activations cannot fit, before allocating them (arguments.check_memory)."""
        check_memory(self.config, batch, height, width, self.vae_dtype, self.device)

    def _image_size(self, image, height, width) -> tuple[int, int, int, int]:
        """(H, W, h, w) for an image-to-image task: height/width default to the image's (see images.py)."""
        factor = self.config.vae.downsample_factor
        return check_size(*default_size(image, height, width, factor), factor)

    def _refuse_inpainting_model(self, what: str) -> None:
        if self.is_inpainting_model and what != "inpaint":
            raise ValueError(f"this is an inpainting checkpoint (9-channel UNet, {self.config.name}); it cannot run "
                             f"{what}: use pipe.inpaint(prompt, image, mask_image), or load a regular checkpoint")
        if self.config.unet.num_classes is not None:
            raise ValueError(f"this is the SD 2 ×4 upscaler ({self.config.name}); it cannot run {what}: use "
                             "pipe.upscale(prompt, image, noise_level=20), or load a regular checkpoint")

    # -- public entry points ---------------------------------------------------------------------------------------
    def txt2img(self, prompt=None, negative_prompt=None, *, num_images: int = 1, steps: int = 30,
                guidance_scale: float = 7.5, sampler="dpmpp_2m", seed: int | None = None, generator=None,
                latents: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
                output_type: str = "pil", callback=None, progress: bool = True, clip_skip: int | None = None,
                prompt_syntax: str = "a1111", prompt_embeds=None, negative_prompt_embeds=None,
                controlnet=None, control_image=None, controlnet_scale=1.0, guess_mode: bool = False,
                control_start=0.0, control_end=1.0, guidance_rescale: float = 0.0,
                deepcache_interval: int | None = None, deepcache_branch: int = 0, tome_ratio: float | None = None):
        """Text → images. prompt: a string or a list (batch); num_images per prompt.

        Returns, for B = len(prompts) · num_images: "pil" a list of B PIL images; "np" float32 [B, H, W, 3] in
        [0, 1]; "pt" [B, 3, H, W] in [0, 1]; "latent" the final scaled latents [B, 4, H/8, W/8].
        latents: explicit starting noise ε ~ N(0, I) [B, 4, H/8, W/8] (a σ-sampler scales it by its first σ).
        callback(i, t, x0_pred): after every step, with the current x̂₀ (scaled latents).
        prompt_syntax: "a1111" (weights, BREAK, editing, long prompts; prompts.py) or "plain" (literal text).
        prompt_embeds / negative_prompt_embeds: contexts [P, 77·k, D] (pipe.encode_prompt) instead of the text.
        controlnet: a ControlNet (ldm_scratch.load_controlnet) or a list; control_image: its map (one per net),
        resized to the output size; controlnet_scale / control_start / control_end: a number or one per net;
        guess_mode: the ControlNets see only the conditional half of the CFG batch (control.py).
        guidance_rescale: φ of Lin et al. 2023 §3.4 (0 = off; 0.7 for zero-terminal-SNR models, diffusion.py).
        deepcache_interval (N), deepcache_branch: DeepCache (fast/deepcache.py); tome_ratio: ToMe (fast/tome.py).
        """
        self._refuse_inpainting_model("txt2img")
        batch, sampler, encode = self._prepare(prompt, negative_prompt, num_images, steps, sampler, output_type,
                                               guidance_scale, None, (prompt_embeds, negative_prompt_embeds,
                                                                      clip_skip, prompt_syntax))
        factor = self.config.vae.downsample_factor
        height, width, h, w = check_size(*txt2img_size(height, width, latents, self.config.image_size, factor),
                                         factor)
        self._check_memory(batch, height, width)
        control = self._control(controlnet, control_image, controlnet_scale, control_start, control_end, guess_mode,
                                guidance_rescale, height, width, batch)
        generators = make_generators(batch, seed, generator)
        noise = starting_noise(latents, (batch, self.config.latent_channels, h, w), generators, self.device)
        return self._run(encode=encode, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                         generators=generators, noise=noise, output_type=output_type, callback=callback,
                         progress=progress, **control, fast=(deepcache_interval, deepcache_branch, tome_ratio))

    def img2img(self, prompt=None, init_image=None, negative_prompt=None, *, strength: float = 0.75,
                num_images: int = 1, steps: int = 30, guidance_scale: float = 7.5, sampler="dpmpp_2m",
                seed: int | None = None, generator=None, latents: torch.Tensor | None = None,
                height: int | None = None, width: int | None = None, output_type: str = "pil", callback=None,
                progress: bool = True, clip_skip: int | None = None, prompt_syntax: str = "a1111", prompt_embeds=None,
                negative_prompt_embeds=None, controlnet=None, control_image=None, controlnet_scale=1.0, guess_mode: bool = False,
                control_start=0.0, control_end=1.0, guidance_rescale: float = 0.0,
                deepcache_interval: int | None = None, deepcache_branch: int = 0, tome_ratio: float | None = None):
        """Image + text → images. Runs the last int(steps × strength) steps starting from the init image's latents
        noised to that level: strength 1 keeps nothing but the rough layout, small strengths change little.

        init_image: a PIL image, a file path, an array [H, W, 3] (uint8, or float in [0, 1]), a tensor [3, H, W] or
        [K, 3, H, W] in [0, 1], or a list of those (K = 1 or one per output image). Size: height/width default to
        the image's (rounded down to a multiple of 8); an image of another size with the same aspect ratio is
        resized (with a warning). Other arguments and the return value as `txt2img`.
        """
        self._refuse_inpainting_model("img2img")
        batch, sampler, encode = self._prepare(prompt, negative_prompt, num_images, steps, sampler, output_type,
                                               guidance_scale, strength, (prompt_embeds, negative_prompt_embeds,
                                                                          clip_skip, prompt_syntax))
        images = load_images(init_image, "init_image")
        height, width, h, w = self._image_size(images[0], height, width)
        self._check_memory(batch, height, width)
        latents = check_latents(latents, (batch, self.config.latent_channels, h, w))
        x = images_to_tensor(images, height, width, "init_image", batch)         # [K, 3, H, W] in [−1, 1]
        control = self._control(controlnet, control_image, controlnet_scale, control_start, control_end, guess_mode,
                                guidance_rescale, height, width, batch)
        generators = make_generators(batch, seed, generator)
        x0 = self.encode_images(x, generators, batch)                           # drawn first
        noise = starting_noise(latents, x0.shape, generators, self.device)      # then ε
        return self._run(encode=encode, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                         generators=generators, noise=noise, x0=x0, strength=strength, output_type=output_type,
                         callback=callback, progress=progress, **control,
                         fast=(deepcache_interval, deepcache_branch, tome_ratio))

    def inpaint(self, prompt=None, image=None, mask_image=None, negative_prompt=None, *, strength: float = 1.0,
                num_images: int = 1, steps: int = 30, guidance_scale: float = 7.5, sampler="dpmpp_2m",
                seed: int | None = None, generator=None, latents: torch.Tensor | None = None,
                height: int | None = None, width: int | None = None, output_type: str = "pil", callback=None,
                progress: bool = True, clip_skip: int | None = None, prompt_syntax: str = "a1111",
                prompt_embeds=None, negative_prompt_embeds=None, controlnet=None, control_image=None, controlnet_scale=1.0, guess_mode: bool = False,
                control_start=0.0, control_end=1.0, guidance_rescale: float = 0.0,
                deepcache_interval: int | None = None, deepcache_branch: int = 0, tome_ratio: float | None = None):
        """Repaint the white part of `mask_image` (black is kept). A 9-channel checkpoint conditions on the mask and
        the masked image; a regular one is steered by mask blending (see the module docstring).

        image: as img2img's init_image. mask_image: a PIL image (converted to grayscale), a path, an array [H, W]
        or a tensor [1, H, W] / [K, 1, H, W] in [0, 1]; binarised at 0.5. strength < 1 starts from the image
        noised (as img2img) instead of pure noise. Other arguments and the return value as `txt2img`.
        """
        self._refuse_inpainting_model("inpaint")                # (an inpainting model may; the ×4 upscaler not)
        batch, sampler, encode = self._prepare(prompt, negative_prompt, num_images, steps, sampler, output_type,
                                               guidance_scale, strength, (prompt_embeds, negative_prompt_embeds,
                                                                          clip_skip, prompt_syntax))
        images, masks = load_images(image, "image"), load_images(mask_image, "mask_image")
        height, width, h, w = self._image_size(images[0], height, width)
        self._check_memory(batch, height, width)
        latents = check_latents(latents, (batch, self.config.latent_channels, h, w))
        x = images_to_tensor(images, height, width, "image", batch)              # [K, 3, H, W] in [−1, 1]
        mask = masks_to_tensor(masks, height, width, batch)                      # [K, 1, H, W], 0 keep / 1 repaint
        control = self._control(controlnet, control_image, controlnet_scale, control_start, control_end, guess_mode,
                                guidance_rescale, height, width, batch)
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
        return self._run(encode=encode, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                         generators=generators, noise=noise, x0=x0 if strength < 1.0 else None, strength=strength,
                         after_step=blend, extra=extra, output_type=output_type, callback=callback,
                         progress=progress, **control, fast=(deepcache_interval, deepcache_branch, tome_ratio))


def load_pipeline(path=None, **options) -> StableDiffusion:
    """`ldm_scratch.load_pipeline`, which lives in loader.py (it builds this class); kept importable from here."""
    from .loader import load_pipeline as load
    return load(path, **options)
