"""A standalone VAE file: the autoencoder alone, to replace the one inside a checkpoint (`load_pipeline(path, vae=…)`,
`--vae`). Most SD v1 fine-tunes are used with a better decoder, e.g. Stability's `vae-ft-mse-840000-ema-pruned`
(the decoder fine-tuned on MSE + LPIPS for sharper faces and text; the encoder is the original).

Layouts read (all strictly: every tensor of ours filled once, every tensor of the file used or allow-listed):

    vae-ft-mse-840000-ema-pruned.safetensors   encoder.*, decoder.*, quant_conv.*, post_quant_conv.* (no prefix)
    … .ckpt                                    the same under 'state_dict', plus the training loss's weights
                                               (loss.*: LPIPS network and discriminator) and EMA copies (model_ema.*)
    a VAE cut out of a whole checkpoint        first_stage_model.encoder.*, …
    a diffusers vae/ folder                    vae/diffusion_pytorch_model.safetensors + config.json (or its parent)

loss.* and model_ema.* are allow-listed, never loaded: the loss is the training objective's own networks, not part
of the autoencoder, and an '-ema-pruned' file's main weights already are the EMA weights. A .ckpt is read with
torch.load(weights_only=True) (tensor_file.py) and never unpickled freely.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from ..vae import VAEConfig
from .keymap import VAE_RULES, diffusers_levels, diffusers_vae_rules, map_component, vae_config_from_shapes
from .loading import (LoadedModel, _config_hints, _network_classes, check_mapping, diffusers_weights_file,
                      fill_module, identify)
from .tensor_file import CheckpointError, TensorFile, key_list, read_json

VAE_PREFIXES = ("first_stage_model.", "")            # a VAE cut out of a whole checkpoint, or a VAE file's own names
ALLOWED_PREFIXES = {"loss.": "the training loss (LPIPS, discriminator), not part of the autoencoder",
                    "model_ema.": "EMA copies; an -ema-pruned file's main weights already are the EMA ones"}


def load_vae(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[nn.Module, VAEConfig]:
    """(our VAE filled from the file, its config) for a standalone VAE file or a diffusers vae/ folder."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path / "vae" if (path / "vae").is_dir() else path, dtype)
    if not path.is_file():
        raise CheckpointError(f"VAE file {path} does not exist (expected e.g. vae-ft-mse-840000-ema-pruned"
                              ".safetensors, or a diffusers vae/ folder)")
    file = TensorFile(path)
    kind = identify(file.shapes)
    if kind != "vae-only":
        what = "a whole model checkpoint" if kind.startswith(("sd-", "sdxl")) else "not a VAE file"
        raise CheckpointError(f"{path} is {what} ({kind}): a standalone VAE holds encoder.* and decoder.* (or "
                              "first_stage_model.encoder.*). Pass the checkpoint itself as the model, and a VAE "
                              "file as vae=.")
    prefix = next(p for p in VAE_PREFIXES if any(k.startswith(p + "encoder.") for k in file.keys()))
    weights = [k for k in file.keys() if not k.startswith(tuple(ALLOWED_PREFIXES))]
    mapping = map_component(weights, prefix, VAE_RULES)
    left = [k for k in weights if not k.startswith(prefix)]
    if left:
        raise CheckpointError(f"{path}: {len(left)} tensor(s) belong to no VAE: {key_list(left)}. A standalone VAE "
                              f"holds {prefix}encoder.*, {prefix}decoder.*, {prefix}quant_conv.* and "
                              f"{prefix}post_quant_conv.* (and, in .ckpt files, loss.* and model_ema.*).")
    return _build(mapping, file, vae_config_from_shapes({o: file.shapes[k] for o, k in mapping.items()}), dtype)


def _load_folder(folder: Path, dtype) -> tuple[nn.Module, VAEConfig]:
    """A diffusers AutoencoderKL folder: diffusion_pytorch_model.safetensors + config.json."""
    file = TensorFile(diffusers_weights_file(folder, "diffusion_pytorch_model"))
    mapping = map_component(file.keys(), "", diffusers_vae_rules(diffusers_levels(file.keys())))
    hints = _config_hints("vae", read_json(folder / "config.json")) if (folder / "config.json").is_file() else {}
    try:
        config = vae_config_from_shapes({o: file.shapes[k] for o, k in mapping.items()}, **hints)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{folder} is not a diffusers VAE folder (missing {error}); expected "
                              "vae/diffusion_pytorch_model.safetensors of an AutoencoderKL") from None
    return _build(mapping, file, config, dtype)


def _build(mapping: dict[str, str], file: TensorFile, config: VAEConfig, dtype) -> tuple[nn.Module, VAEConfig]:
    vae_class, _, what = _network_classes()["vae"]
    with torch.device("meta"):
        vae = vae_class(config)
    check_mapping(vae, mapping, file.shapes, what)
    return fill_module(vae, mapping, file.get, file.shapes, what, dtype).eval(), config


def with_vae(loaded: LoadedModel, path: str | os.PathLike, dtype: torch.dtype | None = None) -> LoadedModel:
    """The loaded model with its VAE replaced by the standalone VAE at `path` (`load_pipeline(…, vae=path)`)."""
    vae, config = load_vae(path, dtype)
    check_vae_fits(config, loaded.config.vae, path)
    return dataclasses.replace(loaded, vae=vae, config=dataclasses.replace(loaded.config, vae=config))


def check_vae_fits(vae: VAEConfig, model: VAEConfig, source) -> None:
    """A replacement VAE must speak the model's latent language: the same latent channels and downsampling factor
    (the UNet was trained on that latent space)."""
    factor = lambda c: 2 ** (len(c.channel_mult) - 1)
    if vae.z_channels != model.z_channels or factor(vae) != factor(model):
        raise CheckpointError(f"the VAE {source} makes {vae.z_channels}-channel latents at 1/{factor(vae)} size, but "
                              f"this model's UNet works on {model.z_channels}-channel latents at 1/{factor(model)} "
                              "size: it belongs to another kind of model")
