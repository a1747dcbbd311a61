"""The pipeline's arguments other than images (images.py) and seeds (seeds.py): prompts, counts, steps,
strength and guidance, the sampler, the default output size, and the memory a call will need.

Each is checked when the pipeline receives it, before any network runs, so a mistake raises an error that names
the argument and says what to give instead (tests/test_pipeline.py: test_bad_input_is_explained;
tests/test_bad_inputs_pipeline.py). A wrong type is a TypeError (a bool is not a count here, a string is not a
number), a wrong value a ValueError.
"""
from __future__ import annotations

import math
import os
from numbers import Real

import numpy as np
import torch

from .diffusion import Schedule
from .images import check_output_type
from .samplers import Sampler, get_sampler
from .samplers.base import steps_to_run


def prepare(prompt, negative_prompt, num_images, steps, sampler, output_type, schedule: Schedule,
            strength: float | None = None, guidance_scale=7.5, *, prompt_embeds=None, negative_prompt_embeds=None,
            text_width: int | None = None, prompt_syntax: str = "a1111"
            ) -> tuple[list[str] | None, list[str] | None, int, Sampler]:
    """The arguments every task shares, checked → (prompts, negative prompts, batch size B, sampler object).

    B = P · num_images for P prompts (or P rows of prompt_embeds). strength is None for txt2img; img2img and
    inpaint check it (check_strength). Given prompt_embeds, prompts is None; given negative_prompt_embeds, the
    negative prompts are None (see prompt_inputs)."""
    check_prompt_syntax(prompt_syntax)
    prompts, negative_prompts, count = prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                                     text_width)
    check_count(num_images, "num_images")
    check_count(steps, "steps")
    check_guidance(guidance_scale)
    check_output_type(output_type)
    if strength is not None:
        check_strength(strength, steps)
    sampler = as_sampler(sampler, schedule)
    sampler.check_steps(steps)            # a step count this sampler cannot run fails here, before the VAE encodes
    return prompts, negative_prompts, count * num_images, sampler


def check_count(value, name: str) -> int:
    """num_images / steps: an int ≥ 1. A bool is refused although Python counts it as an int (True == 1): it is
    always a mistake here (a flag passed in the wrong place)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int ≥ 1, got {value!r} ({type(value).__name__}); e.g. {name}=1, or "
                        f"int({name}) for a numpy integer")
    if value < 1:
        raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
    return int(value)


def check_guidance(guidance_scale) -> float:
    """guidance_scale s of eq 4.4: a finite real number (1 = no guidance, 7.5 the usual). NaN or inf would run
    every step and only show up as a NaN image at the end."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, Real):
        raise TypeError(f"guidance_scale must be a number (e.g. 7.5; 1 = no guidance), got {guidance_scale!r} "
                        f"({type(guidance_scale).__name__})" + ("; convert it with float()"
                                                                  if isinstance(guidance_scale, str) else ""))
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (e.g. 7.5; 1 = no guidance), got {guidance_scale}")
    return float(guidance_scale)


def check_guidance_rescale(guidance_rescale) -> float:
    """guidance_rescale φ: a number in [0, 1] (Lin et al. 2023; 0 = off)."""
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, Real) \
            or not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must be a number in [0, 1] (φ of Lin et al. 2023; 0 = off, 0.7 "
                         f"is their choice), got {guidance_rescale!r}")
    return float(guidance_rescale)


def check_strength(strength, steps: int) -> int:
    """img2img / inpaint strength in (0, 1] → the number of steps that run, int(steps × strength) ≥ 1.

    Strength 0 is refused rather than returning the image: nothing would be denoised, and the "unchanged" image
    would still have been through the VAE (not the input). The CLI gets the same error (it calls this too)."""
    if isinstance(strength, bool) or not isinstance(strength, Real):
        raise TypeError(f"strength must be a number in [0, 1], got {strength!r} ({type(strength).__name__})")
    if not 0.0 <= strength <= 1.0:   # also false for NaN
        raise ValueError(f"strength must be in [0, 1] (small values change little, 1 replaces the image), got "
                         f"{strength!r}")
    if strength == 0:
        raise ValueError(f"strength 0 denoises nothing (no step would run, the image would come back only "
                         f"re-encoded); give a strength above 0, at least 1/steps = {1 / steps:.3g} for {steps} steps")
    return steps - steps_to_run(steps, float(strength), img2img=True)  # also: ≥ 1 step must be left


PROMPT_SYNTAXES = ("a1111", "plain")


def check_prompt_syntax(prompt_syntax) -> str:
    """"a1111" (AUTOMATIC1111's weights, BREAK, editing, long prompts: prompts.py) or "plain" (literal text)."""
    if not isinstance(prompt_syntax, str) or prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {PROMPT_SYNTAXES} (\"a1111\": (word:1.3), [word], BREAK, "
                         f"[from:to:when], long prompts; \"plain\": the text as written), got {prompt_syntax!r}")
    return prompt_syntax


def prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, text_width: int | None
                  ) -> tuple[list[str] | None, list[str] | None, int]:
    """(prompts or None, negative prompts or None, P): text or precomputed contexts, one of each side at most.

    prompt_embeds [P, 77·k, D] replaces `prompt`; negative_prompt_embeds [P, 77·m, D] replaces `negative_prompt`
    (D = the text encoder's width; k and m may differ: the shorter is padded, conditioning.py)."""
    if prompt_embeds is None and negative_prompt_embeds is None:
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        return prompts, negatives, len(prompts)
    if prompt_embeds is not None and prompt is not None:
        raise ValueError("give either prompt or prompt_embeds, not both (prompt_embeds is the encoded prompt: "
                         "pipe.encode_prompt(prompt))")
    if prompt_embeds is None and prompt is None:
        raise ValueError("no prompt: give prompt (text) or prompt_embeds (from pipe.encode_prompt)")
    if negative_prompt_embeds is not None and negative_prompt is not None:
        raise ValueError("give either negative_prompt or negative_prompt_embeds, not both")
    prompts = None if prompt_embeds is not None else _as_prompt_list(prompt, "prompt")
    count = check_prompt_embeds(prompt_embeds, "prompt_embeds", text_width) if prompts is None else len(prompts)
    if negative_prompt_embeds is not None:
        check_prompt_embeds(negative_prompt_embeds, "negative_prompt_embeds", text_width, count)
        return prompts, None, count
    negatives = [""] * count if negative_prompt is None else _as_prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * count
    if len(negatives) != count:
        raise ValueError(f"{len(negatives)} negative prompts for {count} prompts; give one, or one per prompt")
    return prompts, negatives, count


def check_prompt_embeds(embeds, name: str, width: int | None, count: int | None = None) -> int:
    """A context tensor [P, 77·k, D] (k ≥ 1 chunks of 77 tokens, D = width); returns P (must equal count)."""
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        raise TypeError(f"{name} must be a float tensor [P, 77·k, D] (as pipe.encode_prompt returns), got "
                        f"{type(embeds).__name__}" + (f" of {embeds.dtype}" if isinstance(embeds, torch.Tensor)
                                                      else ""))
    shape = tuple(embeds.shape)
    if embeds.ndim != 3 or shape[0] < 1 or shape[1] < 77 or shape[1] % 77:
        raise ValueError(f"{name} must have shape [P, 77·k, D] (P prompts, k ≥ 1 chunks of 77 tokens), got {shape}")
    if width is not None and shape[2] != width:
        raise ValueError(f"{name} has width D = {shape[2]} but this model's text encoder gives {width}; encode the "
                         "prompt with this pipeline (pipe.encode_prompt)")
    if count is not None and shape[0] != count:
        raise ValueError(f"{name} holds {shape[0]} prompts but there are {count}; give one row per prompt")
    if not torch.isfinite(embeds).all():
        raise ValueError(f"{name} contains NaN or inf")
    return shape[0]


def prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    """(prompts, negative prompts), one negative per prompt: None gives "" (the unconditional prompt), a single
    negative prompt is used for every prompt."""
    prompts = _as_prompt_list(prompt, "prompt")
    if negative_prompt is None:
        return prompts, [""] * len(prompts)
    negative_prompts = _as_prompt_list(negative_prompt, "negative_prompt")
    if len(negative_prompts) == 1:
        negative_prompts = negative_prompts * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts; give one, or one "
                         "per prompt")
    return prompts, negative_prompts


def _as_prompt_list(prompt, what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        if not prompt:
            raise ValueError(f"{what} is an empty list; give at least one prompt (a string, or a list of strings)")
        return list(prompt)
    raise TypeError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}")


def as_sampler(sampler, schedule: Schedule) -> Sampler:
    """A sampler name (see ldm_scratch.samplers.SAMPLERS) → that sampler on `schedule`; a Sampler is kept."""
    if isinstance(sampler, str):
        return get_sampler(sampler, schedule=schedule)
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a name (see ldm_scratch.samplers.SAMPLERS) or a Sampler, got "
                        f"{type(sampler).__name__}")
    wanted, built = schedule.config.prediction_type, sampler.schedule.config.prediction_type
    if built != wanted:   # it would read the network's output as the wrong quantity (v as ε): a wrong image, no error
        raise ValueError(f"the sampler was built for prediction_type={built!r}, but this model predicts {wanted!r}: "
                         "build it with get_sampler(name, schedule=pipe.schedule, ...)")
    return sampler


def txt2img_size(height, width, latents, native: int, factor: int) -> tuple:
    """txt2img's (height, width) where not given: the latents' [B, 4, h, w] × factor if given, else the model's
    native resolution (`config.image_size`: 512 for SD v1). Checked later by images.check_size."""
    if isinstance(latents, (torch.Tensor, np.ndarray)) and latents.ndim == 4:
        height = latents.shape[2] * factor if height is None else height
        width = latents.shape[3] * factor if width is None else width
    return native if height is None else height, native if width is None else width


# ---------------------------------------------------------------------------------------------------------------
# Memory: refuse a size that cannot fit before allocating any of it
# ---------------------------------------------------------------------------------------------------------------

MEMORY_LIMIT_ENV = "LDM_SCRATCH_MAX_MEMORY_GB"   # GiB; "inf" turns the check off


def estimate_memory(config, batch: int, height: int, width: int, itemsize: int = 4) -> int:
    """Bytes of activations a call needs at its peak: a simple upper estimate, the larger of two terms.

        decoder  B · H · W · (3·C₁ + C₀) · itemsize
        latents  B · z · h · w · 4 bytes · 16

    The VAE decoder peaks in its first full-resolution ResBlock (C₀ = base width, C₁ = the width of the level
    below, whose upsampled output is the block's input): its input x (C₁), GroupNorm's output (C₁), conv1's
    output (C₀), and a C₁-sized temporary beside them (fast/vae_bands.py lists them). SD v1: C₀ = 128, C₁ = 256,
    so 896 numbers per pixel and image: 896 MiB at 512², 120 GiB at 6000² in float32. Measured on CPU (SD v1
    widths, random weights, peak RSS over one decode): plain 835 MiB at 512² (232 at 256², against 224: the
    fixed costs of a small image), the banded decoder of load_pipeline(fast=True) 445 MiB. The latents term
    (float32 state, noise, x̂₀, ε̂ for [uncond; cond], a sampler's history: 16 copies, generously) is 1/64 of the
    pixels. Not counted: the UNet (2B · 320 channels at h·w = H·W/64, far below the decoder) and attention scores,
    which the fused attention kernel never holds whole; the encoder (img2img, inpaint) peaks below the decoder.
    """
    widths = [config.vae.base_channels * m for m in config.vae.channel_mult]
    c0, c1 = widths[0], widths[min(1, len(widths) - 1)]
    factor = config.vae.downsample_factor
    decoder = batch * height * width * (3 * c1 + c0) * itemsize
    latents = batch * config.latent_channels * (height // factor) * (width // factor) * 4 * 16
    return max(decoder, latents)


def memory_limit(device: torch.device) -> tuple[float, str]:
    """(bytes, where the number comes from): $LDM_SCRATCH_MAX_MEMORY_GB if set, else the device's memory (a CUDA
    GPU's total, otherwise this machine's physical memory), else inf when the system does not say."""
    text = os.environ.get(MEMORY_LIMIT_ENV)
    if text:
        try:
            gib = float(text)
        except ValueError:
            raise ValueError(f"{MEMORY_LIMIT_ENV}={text!r} is not a number of GiB (e.g. 32, or inf to turn the "
                             "memory check off)") from None
        if not gib > 0:
            raise ValueError(f"{MEMORY_LIMIT_ENV}={text!r} must be a positive number of GiB (or inf)")
        return gib * 2**30, f"{MEMORY_LIMIT_ENV}={text}"
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory), f"the memory of {device}"
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this machine's memory"
    except (ValueError, OSError, AttributeError):   # no sysconf (Windows): no limit we can know
        return math.inf, "unknown"


def check_memory(config, batch: int, height: int, width: int, dtype: torch.dtype, device: torch.device) -> int:
    """Refuse (ValueError) a call whose estimated peak (estimate_memory) exceeds memory_limit; returns the estimate."""
    need = estimate_memory(config, batch, height, width, torch.empty((), dtype=dtype).element_size())
    limit, source = memory_limit(torch.device(device))
    if need > limit:
        per_image = estimate_memory(config, 1, 512, 512, torch.empty((), dtype=dtype).element_size())
        raise ValueError(
            f"{batch} image(s) of {width}×{height} would need about {need / 2**30:.1f} GiB for the VAE decoder's "
            f"activations alone, more than the {limit / 2**30:.1f} GiB limit ({source}). Give a smaller height/width "
            f"(an init image is resized to it; 512×512 needs {per_image / 2**30:.2f} GiB per image) or fewer "
            f"images, or set {MEMORY_LIMIT_ENV} to the GiB you have (inf turns this check off).")
    return need


def check_device(name) -> None:
    """Before loading: `device` names a device this PyTorch can use (cuda without CUDA would otherwise end, after
    the model is loaded, in torch's AssertionError "Torch not compiled with CUDA enabled")."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"device {name!r} is not a device name ({error}); use cpu, cuda, cuda:1, mps, …") from None
    if device.type == "meta":
        raise ValueError(f"device {name} holds no data, so it cannot run the model; use cpu or cuda")
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and not backend.is_available():
        why = ("this PyTorch was built without CUDA" if device.type == "cuda" and torch.version.cuda is None
               else "no usable device or driver was found")
        raise ValueError(f"device {name}: PyTorch {torch.__version__} cannot use {device.type} here ({why}); "
                         "use the CPU (device='cpu', --device cpu), or install a PyTorch build for your GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name}: there are only {torch.cuda.device_count()} CUDA device(s), numbered "
                         f"from 0; use cuda:0")
