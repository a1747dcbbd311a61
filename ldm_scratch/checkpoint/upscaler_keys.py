"""The SD 2 ×4 upscaler's file (x4-upscaler-ema.safetensors / .ckpt; x4-upscaling.yaml): what it adds to an SD 2
file, and the numbers its shapes do not show.

Its three networks are SD 2's, configured differently, in the same places and names:

    model.diffusion_model.*       UNet: 7 input channels (4 latent + 3 low-resolution RGB), widths 256·[1, 2, 2, 4],
                                  8 heads, attention at levels 1–3, self-attention off at levels 1 and 2, and
                                  label_emb.weight [1000, 1024]: the noise level as a class label
    first_stage_model.*           a KL-VAE with 3 levels (ch_mult [1, 2, 4]): ×4 down, latents at 1/4 size;
                                  `attn_resolutions: []` as in SD v1 (no attention in the levels), and the
                                  mid blocks keep their one self-attention (CompVis builds mid.attn_1 always)
    cond_stage_model.model.*      OpenCLIP ViT-H, as in every SD 2 file (openclip_keys.py)
    low_scale_model.*             the noise-augmentation schedule of the low-resolution image, 8 buffers
                                  (ImageConcatWithNoiseAugmentation.register_schedule): recomputed, allowed by name

At full size the UNet has 473,398,020 parameters and the VAE 55,325,927 (ours, counted from the yaml's sizes).

The shapes tell the UNet's new switches: `label_emb.weight` [num_classes, time_dim] gives num_classes, and a
level's first attention with keys of the context's width (to_k [C, 1024] where C ≠ 1024) has its self-attention
disabled (it attends to the prompt instead). Where a level's width equals the context's (1024, the upscaler's
last level) the shape cannot tell; the official file attends to itself there (disable_self_attentions
[True, True, True, False]), and that is what we read.
"""
from __future__ import annotations

import re
from typing import Iterable

from .tensor_file import CheckpointError

LOW_SCALE_PREFIX = "low_scale_model."
LOW_SCALE_BUFFERS = tuple(LOW_SCALE_PREFIX + name for name in (   # all derived from β: recomputed in upscale.py
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"))

# What x4-upscaling.yaml says and the tensors do not: the latent scale, the β schedule of the model (CompVis'
# "linear", which is β_t = linspace(√0.0001, √0.02, T)², the same formula as SD's), v-prediction, 512² outputs.
UPSCALER_NUMBERS = dict(latent_scale=0.08333, beta_start=0.0001, beta_end=0.02, image_size=512)
# The UNet sizes the shapes do not show: 8 heads of any width (num_heads: 8, no num_head_channels), no upcast.
UPSCALER_UNET_HINTS = {"n_heads": 8, "head_dim": None, "upcast_attention": False}


def low_scale_buffers(keys: Iterable[str]) -> list[str]:
    """The file's noise-augmentation buffers (allowed by name, never loaded)."""
    return [key for key in keys if key in LOW_SCALE_BUFFERS]


def check_upscaler_file(shapes: dict[str, tuple], path) -> None:
    """A 7-channel SD 2 file without its noise-level embedding is a damaged upscaler, not some other model."""
    if "model.diffusion_model.label_emb.weight" not in shapes:
        raise CheckpointError(f"{path} looks like the SD 2 ×4 upscaler (7-channel UNet input) but has no "
                              "model.diffusion_model.label_emb.weight (its noise-level embedding, [1000, 1024]): the "
                              "file is incomplete or damaged. Download x4-upscaler-ema.safetensors again.")


def self_attention_switches(shapes: dict[str, tuple], context_dim: int) -> dict:
    """{num_classes, disable_self_attention, disable_middle_self_attention} read off a UNet's shapes (our names):
    the class embedding's rows, and which attending levels' first attention has context-wide keys."""
    def reads_context(prefix: str) -> bool:
        key_shape = shapes.get(f"{prefix}.blocks.0.self_attn.to_k.weight")
        return key_shape is not None and key_shape[1] == context_dim != key_shape[0]

    levels = sorted({int(m[1]) for key in shapes if (m := re.fullmatch(r"down\.(\d+)\.attn\.0\.norm\.weight", key))})
    return dict(num_classes=shapes.get("class_embedding.weight", (None,))[0],
                disable_self_attention=tuple(level for level in levels if reads_context(f"down.{level}.attn.0")),
                disable_middle_self_attention=reads_context("middle.attn"))
