"""load_pipeline: a checkpoint (official single file, diffusers folder, or the bundled tiny model) → StableDiffusion.

Reading and checking the files is checkpoint/'s work; here the pieces are put together: a standalone VAE (KL-VAE
file or folder, or TAESD) in place of the checkpoint's own, the tokenizer, the device, and the fast path.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .arguments import check_device
from .checkpoint import CheckpointError, load_models
from .checkpoint.vae_file import with_vae
from .fast import install
from .fast.taesd import is_taesd, load_taesd
from .pipeline import BUNDLED_MODEL, StableDiffusion


def packs_by_default(dtype: torch.dtype, device: str | torch.device) -> bool:
    """load_pipeline's prepack=None: packed weights for a bfloat16 UNet on the CPU (its docstring says why)."""
    return dtype == torch.bfloat16 and torch.device(device).type == "cpu"


def load_pipeline(path=None, *, use_ema: bool = False, dtype: torch.dtype | None = torch.float32,
                  device: str | torch.device = "cpu", tokenizer=None, fast: bool = True, vae=None,
                  prediction_type: str | None = None, prepack: bool | None = None) -> StableDiffusion:
    """Load an official SD v1/v2 single file, a diffusers folder, or (path=None) the bundled tiny model.

    dtype: the networks' dtype (default float32; None keeps the file's). tokenizer: None finds the vocabulary as
    `load_tokenizer` does (a diffusers folder's tokenizer/, else the user cache); or a path for `load_tokenizer`,
    or a tokenizer object. vae: a standalone VAE instead of the checkpoint's own: a KL-VAE file or diffusers vae/
    folder (checkpoint/vae_file.py), or TAESD (fast/taesd.py; fast previews, lower quality).
    prediction_type: "epsilon" or "v_prediction", overriding what the file (or a .yaml beside it) says
    (checkpoint/prediction.py: how it is detected).

    fast: put the networks on the fast path (`ldm_scratch.fast.install`): the UNet and the VAE in channels_last
    (10–18 % faster convolutions on CPU), the VAE's decoder in row bands at inference (a lower peak memory at
    large sizes), and the memory the conversion freed handed back to the OS. `pipe.vae.decode(z)` then runs banded
    too. fast=False leaves the networks as their classes build them (contiguous layout, plain vae.py layers), the
    code a reader follows. Both give the same images up to float32 rounding (channels_last convolutions add up in
    another order; the bands sum GroupNorm's statistics in two passes): on the bundled tiny model, max |fast −
    plain| over [0, 1] pixels was 2.8e-5 at 64² and 6.2e-5 at 128² (4 steps; tests/test_pipeline.py).
    prepack: also keep the UNet's convolution (and bfloat16 linear) weights packed for oneDNN
    (`ldm_scratch.fast.prepack`): a faster step on CPU for one more copy of those weights (+1.6 GiB for SD v1 in
    bfloat16). None (the default) = on for a bfloat16 pipeline on the CPU with fast=True, off otherwise: whoever
    asks for bfloat16 asks for speed, and bfloat16 weights + their packed copy (3.2 GiB for SD v1's UNet) still
    take less than the float32 UNet alone (3.4 GiB); in float32 the copy would add 2.2 GiB for a smaller gain
    (README "bfloat16 on a CPU"). True / False decide it either way.
    """
    check_device(device)                              # before loading: cuda without CUDA fails here, clearly
    if path is None:
        path = BUNDLED_MODEL
        if not path.is_file():
            raise CheckpointError(f"the bundled model {path} is missing; pass the path of a checkpoint instead")
    loaded = load_models(path, use_ema=use_ema, dtype=dtype, prediction_type=prediction_type)
    if vae is not None and is_taesd(vae):             # TAESD instead of the KL-VAE, at this model's latent scale
        loaded.vae = load_taesd(vae, latent_scale=float(loaded.config.latent_scale), dtype=dtype)
    elif vae is not None:
        loaded = with_vae(loaded, vae, dtype)         # checked to fit the model's latent space
    tokenizer_path = loaded.tokenizer_path
    if isinstance(tokenizer, (str, Path, tuple, list)):
        tokenizer_path, tokenizer = tokenizer, None
    text_encoder, unet, vae = (m.to(device) for m in (loaded.text_encoder, loaded.unet, loaded.vae))
    if prepack is None:
        prepack = fast and packs_by_default(unet.input_conv.weight.dtype, device)
    if fast:
        install(text_encoder=text_encoder, unet=unet, vae=vae, prepack=prepack)
    elif prepack:
        raise ValueError("prepack=True is part of the fast path: it needs fast=True")
    return StableDiffusion(text_encoder, unet, vae, loaded.config, tokenizer=tokenizer,
                           tokenizer_path=tokenizer_path, device=device)
