"""Cross-attention maps: which pixels each word of the prompt controls (DAAM, Tang et al. 2022).

Every cross-attention layer of the UNet computes, for each latent pixel (query) and each prompt token (key), the
probability with which the pixel reads that token: F[t, l, h] ∈ [B, N = h_l·w_l, 77] at step t, layer l, head h.
DAAM upsamples each map to the image size and sums (their eq. 3–4):

    D_k(x, y) = Σ_t Σ_l Σ_h  F↑[t, l, h](x, y, k)          ↑: bicubic upsampling from h_l × w_l to H × W

We return the mean instead of the sum (divide by the number of terms), so a value keeps the meaning of an attention
probability and maps from runs with different step counts compare. Upsampling is linear, so we add the maps of each
resolution at their own size and upsample each sum once at the end: the same numbers at a fraction of the cost.

    maps = attention_maps(pipe, "a red circle on a blue background", seed=0)
    maps[(3, "circle")]        # [H, W] float tensor;  maps.image: the generated image;  maps.tokens: the keys
    overlay(maps.image, maps[(3, "circle")])    # a PIL image with the map drawn over it as a heat map
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..attention import hooks
from .denoise import (check_guidance, check_model, check_steps, denoise, encode_text, latents_to_output,
                      prompt_tokens, starting_noise)


def feature_map_size(tokens: int, height: int, width: int) -> tuple[int, int]:
    """(h_l, w_l) of a layer with `tokens` = h_l·w_l queries, for a latent of height × width: the UNet halves the
    size at each level, rounding up (a stride-2 convolution with padding 1), so try 1, 2, 4, … halvings."""
    h, w = height, width
    while h * w > tokens and h > 1:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != tokens:
        raise ValueError(f"an attention layer with {tokens} queries is no halving of the {height}×{width} latent")
    return h, w


class CrossAttentionSum:
    """An attention hook that adds up the conditional rows' cross-attention probabilities over heads and layers,
    per resolution: {(h_l, w_l): [rows, h_l, w_l, 77]} and the number of (layer, head) maps added. `rows` are the
    last `rows` entries of the UNet's batch (the conditional half, see denoise.guided_eps)."""

    def __init__(self, latent_size: tuple[int, int], rows: int):
        self.latent_size, self.rows = latent_size, rows
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.count = 0

    def __call__(self, layer, kind, q, k, v, probs):
        if kind != "cross":
            return None
        size = feature_map_size(probs.shape[2], *self.latent_size)
        cond = probs[-self.rows:].float().sum(dim=1)                     # Σ_h over heads: [rows, N, 77]
        cond = cond.reshape(self.rows, *size, probs.shape[-1])           # [rows, h_l, w_l, 77]
        self.sums[size] = self.sums[size] + cond if size in self.sums else cond
        self.count += probs.shape[1]
        return None

    def upsampled(self, height: int, width: int) -> torch.Tensor:
        """The mean map of every token at height × width: [rows, 77, H, W] (bicubic, as DAAM)."""
        total = 0
        for (h, w), summed in self.sums.items():
            maps = summed.permute(0, 3, 1, 2)                            # [rows, 77, h_l, w_l]
            if (h, w) != (height, width):
                maps = F.interpolate(maps, size=(height, width), mode="bicubic", align_corners=False)
            total = total + maps
        if not self.count:
            raise ValueError("no cross-attention was recorded: did the UNet run inside the hook?")
        return total / self.count


class TokenMaps(dict):
    """{(index, token): [H, W] map} with the generated `image` (PIL) and the `prompt` beside it."""
    image: Image.Image
    prompt: str


@torch.inference_mode()
def attention_maps(pipe, prompt: str, *, seed: int = 0, steps: int = 30, guidance_scale: float = 7.5,
                   negative_prompt: str = "", height: int | None = None, width: int | None = None) -> TokenMaps:
    """Generate `prompt` (DDIM, `steps`, classifier-free guidance) and return one DAAM map per prompt token.

    Keys: (index, token), index the token's position in the 77-token sequence (1 = the first word), so a word
    that occurs twice gives two entries. Values: [H, W] float tensors at the image size, the mean cross-attention
    probability of each pixel for that token over steps, layers and heads (module docstring).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    check_model(pipe)
    steps, guidance_scale = check_steps(steps), check_guidance(guidance_scale)
    tokens = prompt_tokens(pipe, prompt)
    noise = starting_noise(pipe, seed, height, width)
    cond = encode_text(pipe, [prompt])
    uncond = encode_text(pipe, [negative_prompt]) if guidance_scale != 1 else None
    recorder = CrossAttentionSum(tuple(noise.shape[-2:]), rows=1)
    with hooks(pipe.unet, recorder, where=lambda layer: layer.kind == "cross"):
        latents = denoise(pipe, noise, cond, uncond, steps, guidance_scale)
    image = latents_to_output(pipe, latents, "pil")[0]
    maps = recorder.upsampled(image.height, image.width)[0]              # [77, H, W]
    result = TokenMaps({(index, token): maps[index] for index, token in tokens})
    result.image, result.prompt = image, prompt
    return result


def heat_colours(values: np.ndarray) -> np.ndarray:
    """values [H, W] in [0, 1] → RGB [H, W, 3] in [0, 1]: black → red → yellow → white (a plain "hot" map)."""
    v = np.clip(values, 0, 1)[..., None]
    return np.clip(np.concatenate([3 * v, 3 * v - 1, 3 * v - 2], axis=-1), 0, 1)


def overlay(image, heat_map, alpha: float = 0.6) -> Image.Image:
    """The image with `heat_map` ([H, W] tensor or array, any scale) drawn over it as a heat map.

    The map is stretched to [0, 1] over its own range (min → 0, max → 1), resized to the image if needed, and
    blended: out = (1 − α)·image + α·colour(map).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    values = torch.as_tensor(heat_map, dtype=torch.float32)
    if values.dim() != 2:
        raise ValueError(f"heat_map must be [H, W], got shape {tuple(values.shape)}")
    values = values - values.min()
    values = values / values.max().clamp_min(1e-12)                       # [0, 1] by the map's own range
    if tuple(values.shape) != (image.height, image.width):
        values = F.interpolate(values[None, None], size=(image.height, image.width), mode="bilinear",
                               align_corners=False)[0, 0]
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    blended = (1 - alpha) * rgb + alpha * heat_colours(values.numpy())   # (1 − α)·image + α·colour(map)
    return Image.fromarray((blended * 255).round().astype(np.uint8))
