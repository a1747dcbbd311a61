"""The KL-regularised autoencoder (the "first stage" of latent diffusion, Rombach et al. 2022, §3.1).

Stable Diffusion does not denoise pixels: it denoises a latent image 8× smaller on each side. This file holds the
network that moves between the two spaces.

    encode:  x [B, 3, H, W] in [-1, 1]  →  q(z | x) = N(mean, diag(σ²)),  mean and σ: [B, 4, H/8, W/8]
    decode:  z [B, 4, H/8, W/8]         →  x̂ [B, 3, H, W], roughly in [-1, 1] (not clamped)

A 512×512 RGB image (786 432 numbers) becomes a 4×64×64 latent (16 384 numbers, 48× fewer), which is why diffusion
in latent space is cheap. The autoencoder was trained with a reconstruction loss, a patch-GAN loss and a small
KL(q(z|x) ‖ N(0, I)) penalty that keeps the latent space smooth without forcing it to be unit variance — its
latents have std ≈ 5.5, which is why the pipeline (not this file) multiplies them by the latent scale 0.18215.

Architecture (SD v1 sizes; `c` = 128 base channels, channel multipliers 1, 2, 4, 4):

    Encoder  conv_in 3→c
             level 0 (H):     2 ResBlocks c→c,    downsample → H/2
             level 1 (H/2):   2 ResBlocks c→2c,   downsample → H/4
             level 2 (H/4):   2 ResBlocks 2c→4c,  downsample → H/8
             level 3 (H/8):   2 ResBlocks 4c→4c   (no downsample)
             mid: ResBlock, self-attention over all H/8·W/8 pixels, ResBlock
             GroupNorm, SiLU, conv_out 4c→2·4  (the mean and log-variance of each latent channel)
    posterior_conv  1×1, 8→8                   → DiagonalGaussian(mean, logvar)
    latent_conv     1×1, 4→4                   (applied to z before the decoder)
    Decoder  conv_in 4→4c, mid (ResBlock, attention, ResBlock),
             level 3 (H/8) … level 0 (H): 3 ResBlocks each, nearest-neighbour ×2 upsample + conv after levels 3, 2, 1
             GroupNorm, SiLU, conv_out c→3

`posterior_conv` and `latent_conv` are called `quant_conv` / `post_quant_conv` in the official checkpoint, a
leftover of the VQ-GAN code this model grew out of: nothing is quantised in the KL autoencoder.
Our level i works at resolution H/2^i in both the encoder and the decoder (the official names index the decoder's
`up.i` the same way; diffusers numbers its up blocks in the opposite order).

Built from these classes the network is plain; `load_pipeline` switches it to the memory-saving row bands of
`ldm_scratch.fast` (fast/vae_bands.py), which compute the same numbers up to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention


@dataclass
class VAEConfig:
    """SD v1's autoencoder (CompVis `first_stage_config`: ch 128, ch_mult 1,2,4,4, num_res_blocks 2, z_channels 4,
    embed_dim 4, double_z true). The encoder always predicts 2·z_channels numbers per latent pixel (mean and
    log-variance: CompVis' double_z), and the latent width equals z_channels (CompVis' embed_dim; 4 in every
    SD v1 file)."""
    in_channels: int = 3                           # RGB in
    out_channels: int = 3                          # RGB out
    base_channels: int = 128                       # c: channels at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)   # level i has c·channel_mult[i] channels; len = number of levels
    num_res_blocks: int = 2                        # per encoder level (the decoder has one more per level)
    z_channels: int = 4                            # channels of the latent z
    norm_groups: int = 32                          # GroupNorm groups
    norm_eps: float = 1e-6                         # GroupNorm ε (CompVis uses 1e-6, not PyTorch's default 1e-5)

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        bad = [self.base_channels * m for m in self.channel_mult if (self.base_channels * m) % self.norm_groups]
        if bad:
            raise ValueError(f"VAEConfig: channel counts {bad} are not divisible by norm_groups={self.norm_groups}; "
                             f"choose base_channels and channel_mult so that every level's width is a multiple of it.")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each side: 2^(levels − 1) = 8 for SD v1."""
        return 2 ** (len(self.channel_mult) - 1)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------

def _norm(channels: int, config: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=config.norm_eps)


class ResBlock(nn.Module):
    """Pre-activation residual block: h = conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))),  out = skip(x) + h.

    x [B, C_in, H, W] → [B, C_out, H, W]. `skip` is a 1×1 conv when the width changes (official `nin_shortcut`),
    else the identity. (No timestep input: unlike the UNet's ResBlock, the autoencoder knows nothing of diffusion.)
    """

    def __init__(self, in_channels: int, out_channels: int, config: VAEConfig):
        super().__init__()
        self.norm1 = _norm(in_channels, config)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, config)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU in place: each norm's output is a fresh tensor nobody else holds (and GroupNorm's backward needs
        # its input, not its output), so this saves one full-size allocation per activation.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # [B, C_out, H, W]
        h = self.conv2(F.silu(self.norm2(h), inplace=True))  # (CompVis' dropout sits here; p = 0 in SD v1)
        return h.add_(self.skip(x))                          # skip(x) + h, into conv2's fresh output


class SelfAttention(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection.

        t = tokens(GroupNorm(x))                         [B, H·W, C]   (one token per pixel)
        out = x + to_out(Attention(to_q t, to_k t, to_v t))

    The only place in the autoencoder where a pixel sees the whole image (at H/8 resolution: 4096 tokens at 512²).
    The official file stores q, k, v, proj_out as 1×1 convolutions; a 1×1 conv on pixels is exactly a Linear on
    tokens, so they are Linear layers here and the loader reshapes [C, C, 1, 1] → [C, C].
    """

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        self.norm = _norm(channels, config)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        out = attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), n_heads=1)  # softmax(QKᵀ/√C)·V
        out = rearrange(self.to_out(out), "b (h w) c -> b c h w", h=height, w=width)
        return out.add_(x)                                   # x + out, into to_out's fresh output


class MidBlock(nn.Module):
    """ResBlock → SelfAttention → ResBlock at the lowest resolution; [B, C, h, w] → [B, C, h, w]."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        self.res1 = ResBlock(channels, channels, config)
        self.attention = SelfAttention(channels, config)
        self.res2 = ResBlock(channels, channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attention(self.res1(x)))


class Downsample(nn.Module):
    """Halve the resolution with a learned 3×3 stride-2 conv: [B, C, H, W] → [B, C, ⌊H/2⌋, ⌊W/2⌋].

    Output pixel (i, j) sees input rows 2i…2i+2 and columns 2j…2j+2. That needs one extra row and column at the
    bottom/right only, so the input is padded (left 0, right 1, top 0, bottom 1) and the conv itself pads nothing.
    This is how CompVis trained the model, and the weights learned that grid. The "natural" conv padding=1
    would centre each window one pixel up-left instead (rows 2i−1…2i+1): every level shifts the features by one
    pixel of its own resolution, 1 + 2 + 4 = 7 image pixels after three levels — about one latent pixel, the
    known 8-pixel shift of re-implementations that pad symmetrically.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (left, right, top, bottom), zeros


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour ×2 then a 3×3 conv; [B, C, h, w] → [B, C, 2h, 2w]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))   # [B, C, 2h, 2w] → conv, same size


class EncoderLevel(nn.Module):
    """One encoder resolution: ResBlocks (the first may change the width), then a Downsample unless it is the last."""

    def __init__(self, in_channels: int, channels: int, config: VAEConfig, downsample: bool):
        super().__init__()
        widths = [in_channels] + [channels] * config.num_res_blocks
        self.res_blocks = nn.ModuleList(ResBlock(a, b, config) for a, b in zip(widths[:-1], widths[1:]))
        self.downsample = Downsample(channels) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nn.Module):
    """One decoder resolution: num_res_blocks + 1 ResBlocks (the first may change the width), then an Upsample
    unless it is the finest level."""

    def __init__(self, in_channels: int, channels: int, config: VAEConfig, upsample: bool):
        super().__init__()
        widths = [in_channels] + [channels] * (config.num_res_blocks + 1)
        self.res_blocks = nn.ModuleList(ResBlock(a, b, config) for a, b in zip(widths[:-1], widths[1:]))
        self.upsample = Upsample(channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


# ---------------------------------------------------------------------------------------------------------------
# Encoder, decoder, posterior
# ---------------------------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """x [B, 3, H, W] → moments [B, 2·z_channels, H/8, W/8] (mean and log-variance, before `posterior_conv`)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        # level i takes the width of level i − 1 (conv_in's for level 0) and downsamples unless it is the last
        incoming = [config.base_channels] + widths[:-1]
        self.levels = nn.ModuleList(EncoderLevel(incoming[i], widths[i], config, downsample=i < len(widths) - 1)
                                    for i in range(len(widths)))
        self.mid = MidBlock(widths[-1], config)
        self.norm_out = _norm(widths[-1], config)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)                                            # [B, c, H, W]
        for level in self.levels:                                      # H → H/2 → H/4 → H/8
            h = level(h)                                               # → [B, 4c, H/8, W/8]
        h = self.mid(h)                                                # [B, 4c, H/8, W/8]
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))   # [B, 2·z_channels, H/8, W/8]


class Decoder(nn.Module):
    """z [B, z_channels, h, w] (after `latent_conv`) → x̂ [B, 3, 8h, 8w]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], config)
        # Level i runs at resolution H/2^i, like the encoder's, but data flows from the last level to level 0:
        # level i takes the width of level i + 1 (the mid block's for the last level) and upsamples unless i = 0.
        incoming = widths[1:] + [widths[-1]]
        self.levels = nn.ModuleList(DecoderLevel(incoming[i], widths[i], config, upsample=i > 0)
                                    for i in range(len(widths)))
        self.norm_out = _norm(widths[0], config)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))                                  # [B, 4c, h, w]
        for level in reversed(self.levels):                            # h → 2h → 4h → 8h
            h = level(h)                                               # → [B, c, 8h, 8w]
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))   # [B, 3, 8h, 8w]


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, diag(σ²)), one independent Gaussian per latent number.

    Built from moments [B, 2·C, h, w]: the first C channels are the mean, the last C the log-variance, which is
    clamped to [−30, 20] as in CompVis (σ between 3·10⁻⁷ and 2·10⁴) so that exp() never under- or overflows.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)  # σ = exp(½ log σ²)
        self.var = torch.exp(self.logvar)        # σ²

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + σ·ε with ε ~ N(0, I) [B, C, h, w] (the reparameterisation trick).

        ε is drawn in float32 on the generator's device (the CPU for `torch.Generator()` or None) and then moved
        to the posterior's device and dtype, so one seed gives the same z on every device and in every dtype
        (up to rounding).
        """
        device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The most likely z: the mean (what img2img pipelines often use instead of a sample)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) per image, [B], summed over channels and pixels.

        For one coordinate, KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²).
        """
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class VAE(nn.Module):
    """The SD v1 KL autoencoder: `encode` images to a latent posterior, `decode` latents to images.

    The latent scale (0.18215 for SD v1) is NOT applied here; the pipeline multiplies after `encode` and divides
    before `decode`.
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = Encoder(config)
        self.posterior_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)  # official: quant_conv
        self.latent_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)            # official: post_quant_conv
        self.decoder = Decoder(config)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x [B, 3, H, W] in [−1, 1], H and W multiples of 8 → posterior q(z|x) over z [B, 4, H/8, W/8]."""
        return DiagonalGaussian(self.posterior_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, 4, h, w] (unscaled latents) → x̂ [B, 3, 8h, 8w], roughly in [−1, 1]; not clamped."""
        return self.decoder(self.latent_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction x̂ = decode(z), z ~ q(z|x)."""
        return self.decode(self.encode(x).sample(generator))
