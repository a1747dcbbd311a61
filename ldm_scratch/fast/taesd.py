"""TAESD, the tiny autoencoder (Ollin Boer Bohan, madebyollin/taesd): the KL-VAE's encoder and decoder distilled
into plain 3×3 convolutions and ReLUs, 1.2 M parameters per half instead of 34 M / 49 M, no attention, no GroupNorm.
Decoding a 512² image costs 0.14 TFLOP instead of the KL-VAE's 2.51 (18× less; encoding 0.12 vs 1.12, counted with
torch.utils.flop_counter); the pictures are slightly blurrier: for fast drafts, and a preview of x̂₀ after every
sampler step.

Its conventions differ from our KL-VAE's, and from diffusers' port; each API says which it uses:

    API                                     latents in / out                        images
    TAESD.decoder(z) / .encoder(x)          already × latent_scale (= the UNet's)   [0, 1]    (the taesd repo)
    TAESD.decode(z) / .encode(x)            ÷ latent_scale (= what pipe.vae sees)   [−1, 1]   (our vae.py, DESIGN.md)
    diffusers AutoencoderTiny.decode/encode as the UNet's (scaling_factor 1.0)      [−1, 1]

`decode`/`encode` give TAESD the KL-VAE's interface, so it can stand in for `pipe.vae`: the pipeline divides the
latents by latent_scale before decoding, and decode multiplies them back ((z / s)·s is z up to float32 rounding).

Shapes for SD v1 (4 latent channels, every width 64), a 512² image:

    encoder  [B, 3, 512, 512] → conv → Block → (stride-2 conv, 3 Blocks) × 3 → conv → [B, 4, 64, 64]
    decoder  [B, 4, 64, 64] → clamp 3·tanh(z/3) → conv, ReLU → (3 Blocks, ×2 nearest, conv) × 3 → Block → conv
             → [B, 3, 512, 512]
    Block(x) = ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x)          (a 1×1 skip conv only where widths differ: never here)

The decoder's clamp keeps latents in (−3, 3), where TAESD was trained; its output is not clamped (the pipeline
clamps to [0, 1] when it makes pictures). Weights: checkpoint/taesd_keys.py has the three published layouts.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, TensorFile, fill_module, map_component, read_json
from ..checkpoint.taesd_keys import DIFFUSERS_TAESD_RULES, official_taesd_rules, taesd_layout
from ..images import to_output

SD_LATENT_SCALE = 0.18215  # SD v1/v2's; TAESD-XL is used with SDXL's 0.13025


def conv(n_in: int, n_out: int, **options) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **options)


class Clamp(nn.Module):
    """z → 3·tanh(z/3): smooth, ≈ z for |z| ≪ 3, never beyond ±3."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / 3) * 3


class Block(nn.Module):
    """Block(x) = ReLU(conv(ReLU(conv(ReLU(conv(x))))) + skip(x)), skip a bias-free 1×1 conv when widths differ."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_encoder(latent_channels: int = 4) -> nn.Sequential:
    """Image [B, 3, H, W] in [0, 1] → latents [B, C, H/8, W/8], already × latent_scale. Indices = the file's keys."""
    return nn.Sequential(
        conv(3, 64), Block(64, 64),                                                      # 0, 1       H
        conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),  # 2, 3-5     H/2
        conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),  # 6, 7-9     H/4
        conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),  # 10, 11-13  H/8
        conv(64, latent_channels))                                                       # 14


def taesd_decoder(latent_channels: int = 4) -> nn.Sequential:
    """Latents [B, C, h, w], already × latent_scale → image [B, 3, 8h, 8w], ≈ [0, 1] (not clamped)."""
    return nn.Sequential(
        Clamp(), conv(latent_channels, 64), nn.ReLU(),                                   # 0, 1, 2    h
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),  # → 2h
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),  # → 4h
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),  # → 8h
        Block(64, 64), conv(64, 3))                                                      # 18, 19


class TinyPosterior:
    """What `TAESD.encode` returns, shaped like the KL-VAE's posterior: TAESD's encoder is deterministic, so
    std = 0 and `sample` draws nothing from the generator (as diffusers' AutoencoderTiny: `.latents`, no draw)."""

    def __init__(self, mean: torch.Tensor):
        self.mean, self.std = mean, torch.zeros_like(mean)

    def sample(self, generator=None) -> torch.Tensor:
        return self.mean


class TAESD(nn.Module):
    """The two halves (either may be None: previews need only the decoder) and the KL-VAE's interface."""

    def __init__(self, latent_channels: int = 4, latent_scale: float = SD_LATENT_SCALE, encoder: bool = True,
                 decoder: bool = True):
        super().__init__()
        self.latent_channels, self.latent_scale = latent_channels, latent_scale
        self.encoder = taesd_encoder(latent_channels) if encoder else None
        self.decoder = taesd_decoder(latent_channels) if decoder else None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z = latents / latent_scale [B, C, h, w] (what the pipeline hands pipe.vae) → image [B, 3, 8h, 8w],
        ≈ [−1, 1]."""
        if self.decoder is None:
            raise ValueError("this TAESD has no decoder: load taesd_decoder.pth (or .safetensors) too")
        return self.decoder(z * self.latent_scale) * 2 - 1   # [0, 1] → [−1, 1]

    def encode(self, x: torch.Tensor) -> TinyPosterior:
        """Image [B, 3, H, W] in [−1, 1] → a posterior whose mean is latents / latent_scale (as pipe.vae.encode)."""
        if self.encoder is None:
            raise ValueError("this TAESD has no encoder (img2img and inpainting need one): load taesd_encoder.pth "
                             "(or .safetensors) too, e.g. from the same folder as the decoder")
        return TinyPosterior(self.encoder((x + 1) / 2) / self.latent_scale)


# ---------------------------------------------------------------------------------------------------------------
# Loading: taesd_encoder / taesd_decoder (.pth or .safetensors), or a diffusers AutoencoderTiny folder
# ---------------------------------------------------------------------------------------------------------------

def load_taesd(*paths: str | os.PathLike, latent_scale: float = SD_LATENT_SCALE,
               dtype: torch.dtype | None = None) -> TAESD:
    """TAESD from its files, strictly (every tensor used once, shapes checked, .pth only with weights_only=True):
    a diffusers AutoencoderTiny folder (or its diffusion_pytorch_model.safetensors), or taesd_encoder.* and/or
    taesd_decoder.* (.pth or .safetensors). Given a decoder file alone, the encoder beside it (the same name with
    "decoder" → "encoder") is loaded too when it exists. Nothing is downloaded.

    latent_scale: the scale of the model TAESD is paired with (SD v1/v2: 0.18215), used only by decode/encode.
    """
    if not paths:
        raise ValueError("load_taesd needs a path: taesd_decoder.pth / .safetensors, or an AutoencoderTiny folder")
    files = [_weights_file(Path(p)) for p in paths]
    for path in list(files):
        sibling = path.with_name(path.name.replace("decoder", "encoder"))
        if "decoder" in path.name and sibling != path and sibling.is_file() and sibling not in files:
            files.append(sibling)
    halves: dict[str, tuple[TensorFile, dict[str, str]]] = {}
    for path in files:
        file = TensorFile(path)
        layout = taesd_layout(file.shapes)
        if layout is None:
            raise CheckpointError(f"{path} is not a TAESD file: expected taesd_encoder / taesd_decoder weights "
                                  "(keys 0.weight, 1.conv.0.weight, …) or a diffusers AutoencoderTiny "
                                  "(encoder.layers.*, decoder.layers.*). A KL-VAE file goes to vae=, not here.")
        rules = DIFFUSERS_TAESD_RULES if layout == "diffusers" else official_taesd_rules(layout)
        mapping = map_component(file.keys(), "", rules)
        for half in ("encoder", "decoder"):
            part = {ours: key for ours, key in mapping.items() if ours.startswith(half + ".")}
            if part and half in halves:
                raise CheckpointError(f"two {half}s given: {halves[half][0].path} and {path}; pass one of each")
            if part:
                halves[half] = (file, part)
    shapes = {ours: file.shapes[key] for file, part in halves.values() for ours, key in part.items()}
    # the latent width: the decoder's first conv [64, C, 3, 3], or the encoder's last [C, 64, 3, 3] (SD: C = 4)
    latent_channels = (shapes.get("decoder.1.weight") or (0, None))[1] or (shapes.get("encoder.14.weight") or (4,))[0]
    taesd = TAESD(latent_channels, latent_scale, encoder="encoder" in halves, decoder="decoder" in halves)
    for half, (file, part) in halves.items():
        own = {name.removeprefix(half + "."): key for name, key in part.items()}
        fill_module(getattr(taesd, half), own, file.get, file.shapes, f"TAESD {half}", dtype)   # strict
    return taesd.eval()


def is_taesd(path: str | os.PathLike) -> bool:
    """Whether `path` holds TAESD weights (an AutoencoderTiny folder, or a file whose key names are TAESD's): how
    `load_pipeline(vae=PATH)` tells TAESD from a KL-VAE file. False for anything unreadable (the KL-VAE loader then
    says what is wrong with it)."""
    try:
        return taesd_layout(TensorFile(_weights_file(Path(path))).shapes) is not None
    except (CheckpointError, OSError):
        return False


def _weights_file(path: Path) -> Path:
    """A file as given; a folder → its AutoencoderTiny weights (diffusers layout, config.json beside them)."""
    if not path.is_dir():
        return path
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin"):
        if (path / name).is_file():
            config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
            if config.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
                raise CheckpointError(f"{path} holds a {config['_class_name']}, not an AutoencoderTiny (TAESD)")
            return path / name
    raise CheckpointError(f"{path}: no diffusion_pytorch_model.safetensors: not a diffusers AutoencoderTiny folder")


# ---------------------------------------------------------------------------------------------------------------
# Per-step previews
# ---------------------------------------------------------------------------------------------------------------

@torch.inference_mode()
def preview(taesd: TAESD, x0_pred: torch.Tensor) -> list:
    """The sampler's x̂₀ (scaled latents [B, C, h, w], what `callback(i, t, x0_pred)` receives) → B PIL images."""
    decoder = taesd.decoder
    if decoder is None:
        raise ValueError("previews need TAESD's decoder: load taesd_decoder.pth (or .safetensors)")
    parameter = next(decoder.parameters())
    image = decoder(x0_pred.to(parameter.device, parameter.dtype)).float().clamp(0, 1)
    return to_output(image, "pil")


def preview_callback(taesd: TAESD, show, every: int = 1):
    """A `callback=` for txt2img / img2img / inpaint: every `every` steps, show(i, t, images) gets the step's x̂₀
    decoded by TAESD (a list of PIL images, one per image in the batch)."""
    def callback(i, t, x0_pred):
        if i % every == 0:
            show(i, t, preview(taesd, x0_pred))
    return callback
