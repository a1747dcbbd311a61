"""The pipeline's arguments other than images (images.py) and seeds (seeds.py): prompts, counts, steps and
strength, the sampler, and the default output size.

Each is checked when the pipeline receives it, before any network runs, so a mistake raises an error that names
the argument and says what to give instead (tests/test_pipeline.py: test_bad_input_is_explained).
"""
from __future__ import annotations

import torch

from .diffusion import Schedule
from .images import check_output_type
from .samplers import Sampler, get_sampler
from .samplers.base import steps_to_run


def prepare(prompt, negative_prompt, num_images, steps, sampler, output_type, schedule: Schedule,
            strength: float | None = None) -> tuple[list[str], list[str], int, Sampler]:
    """The arguments every task shares, checked → (prompts, negative prompts, batch size B, sampler object).

    B = len(prompts) · num_images. strength is None for txt2img; img2img and inpaint check it in [0, 1]."""
    prompts, negative_prompts = prompt_lists(prompt, negative_prompt)
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    check_output_type(output_type)
    if strength is not None:
        if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1] (0 keeps the image, 1 replaces it), got {strength!r}")
        steps_to_run(steps, strength, img2img=True)  # also: steps × strength must leave at least one step
    else:
        steps_to_run(steps, 1.0, img2img=False)
    return prompts, negative_prompts, len(prompts) * num_images, as_sampler(sampler, schedule)


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
    return sampler


def txt2img_size(height, width, latents, native: int, factor: int) -> tuple:
    """txt2img's (height, width) where not given: the latents' [B, 4, h, w] × factor if given, else the model's
    native resolution (`config.image_size`: 512 for SD v1). Checked later by images.check_size."""
    if isinstance(latents, torch.Tensor) and latents.dim() == 4:
        height = latents.shape[2] * factor if height is None else height
        width = latents.shape[3] * factor if width is None else width
    return native if height is None else height, native if width is None else width
