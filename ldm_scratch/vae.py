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

Memory. At 512² the decoder's last levels hold the largest activations of the whole pipeline: the last upsample
makes [1, 256, 512, 512] (256 MiB in float32) and every activation after it is [1, 128, 512, 512] (128 MiB).
Without autograd (inference), the ResBlocks, the upsamples and the decoder's output layer therefore run in bands
of rows ("Row bands" below): the same numbers, without the full-size temporaries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention
from .memory import release_freed_memory


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

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple]) -> "VAEConfig":
        """The config whose VAE has these parameter shapes; keys are OUR state-dict names (after the rule tables).
        GroupNorm's group count and ε leave no trace in the shapes and keep their SD v1 values."""
        base, in_channels = shapes["encoder.conv_in.weight"][:2]
        n_levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.levels."))
        n_res = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.levels.0.res_blocks."))
        widths = [shapes[f"encoder.levels.{i}.res_blocks.0.conv1.weight"][0] for i in range(n_levels)]
        return cls(in_channels=in_channels, out_channels=shapes["decoder.conv_out.weight"][0], base_channels=base,
                   channel_mult=tuple(w // base for w in widths), num_res_blocks=n_res,
                   z_channels=shapes["latent_conv.weight"][0])


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
        rows = _rows_per_band(x)
        if rows is not None:                                 # inference on a large x: the same block in row bands
            return self._forward_in_bands(x, rows)
        # SiLU in place: each norm's output is a fresh tensor nobody else holds (and GroupNorm's backward needs
        # its input, not its output), so this saves one full-size allocation per activation.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))  # (CompVis' dropout sits here; p = 0 in SD v1)
        return h.add_(self.skip(x))                          # skip(x) + h, into conv2's fresh output

    def _forward_in_bands(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """forward(x) computed `rows` output rows at a time (see "Row bands"). Alive at once: x and one tensor of
        the output's size, h, plus band-sized pieces; conv2's result (+ skip(x)) is written back into h band by
        band."""
        h = _conv3x3_in_bands(self.conv1, _normalised_rows(self.norm1, x, rows),
                              _empty_like(x, self.conv1.out_channels), rows)
        return _conv3x3_in_bands(self.conv2, _normalised_rows(self.norm2, h, rows), h, rows,
                                 residual=lambda r0, r1: self.skip(x[:, :, r0:r1]))


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
        rows = _rows_per_band(x)
        if rows is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        # in row bands: the 4×-size nearest-neighbour copy [B, C, 2h, 2w] is never made, only a band of it at a time
        batch, channels, height, width = x.shape
        return _conv3x3_in_bands(self.conv, lambda a, b: _upsampled_rows(x, a, b),
                                 _empty_like(x, channels, 2 * height, 2 * width), rows)


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
    """One decoder resolution: num_res_blocks + 1 ResBlocks, then an Upsample unless it is the finest level.
    `Decoder.forward` runs `blocks()` one after the other."""

    def __init__(self, in_channels: int, channels: int, config: VAEConfig, upsample: bool):
        super().__init__()
        widths = [in_channels] + [channels] * (config.num_res_blocks + 1)
        self.res_blocks = nn.ModuleList(ResBlock(a, b, config) for a, b in zip(widths[:-1], widths[1:]))
        self.upsample = Upsample(channels) if upsample else None

    def blocks(self) -> list[nn.Module]:
        return [*self.res_blocks] + ([self.upsample] if self.upsample is not None else [])


# ---------------------------------------------------------------------------------------------------------------
# Row bands: the same numbers in less memory, for inference at large sizes
# ---------------------------------------------------------------------------------------------------------------
#
# Run plainly at 512², the decoder's first ResBlock at full resolution holds its input [1, 256, 512, 512] (256 MiB),
# GroupNorm's output (256 MiB) and conv1's output [1, 128, 512, 512] (128 MiB) at once, and the upsample before it
# holds the nearest-neighbour copy [1, 256, 512, 512] beside its conv's output (256 MiB each). The intermediates
# are not needed whole:
#
# - a 3×3 convolution with padding 1 is local: output rows r0…r1−1 read input rows r0−1…r1 only (one halo row on
#   each side; beyond the image's top and bottom edges, zeros: the conv's own padding);
# - GroupNorm is not local (every output depends on its group's mean and variance over the whole image), but once
#   those statistics are known it is a per-channel affine map, GroupNorm(x) = x·scale + shift, that any rows can
#   be put through on their own. So the statistics are computed first, over all of x, and the rows after.
#
# Without autograd, a large layer therefore runs BAND_ROWS output rows at a time: make rows r0−1…r1 of the conv's
# input (normalise and SiLU them, or upsample them), pad the image edges with zero rows, convolve, and write the
# result into rows r0…r1−1 of a preallocated output. Only band-sized temporaries exist. A ResBlock writes conv2's
# result (+ skip(x)) back into conv1's output, so it holds its input and one output-sized tensor: 256 + 128 MiB
# for the block above (plain: up to 640), 64 + 256 MiB for the upsample (plain: 576).
#
# Exactness: the band's convolution does the same multiply-adds in the same order as the whole one (bit for bit
# equal on CPU, measured); GroupNorm's statistics are summed in another order (two passes, bands added up in
# float64), so results differ from the plain layers by rounding only (tests/test_performance_options.py). At full
# size they are the more exact ones: PyTorch's CPU GroupNorm on channels_last tensors (the decoder's are, from the
# mid block's attention on, whatever the model's layout) sums its statistics in one float32 pass, off by up to
# 5·10⁻⁵ for a 512² group. Decoding 512² with random SD v1 weights, max |x̂ − x̂_float64| was 2.3·10⁻⁴ with the
# plain layers and 1.5·10⁻⁵ in bands (diffusers: 3.4·10⁻⁶).
# Training keeps the plain code: backward keeps the activations anyway, so bands would save nothing there.

BAND_ROWS = 16   # output rows per band: at 512 pixels wide, 16 rows of 128 channels are 4 MiB in float32. Measured
                 # at 512²: 8 rows cost 6 % more time with 2 threads; 32 rows peaked 50 MiB higher (larger
                 # temporaries, more freed memory kept by the C allocator); 16 rows is as fast as the plain layers.


def _rows_per_band(x: torch.Tensor) -> int | None:
    """BAND_ROWS when a layer on x [B, C, H, W] should run in row bands (no autograd, more than one band); else None."""
    return None if torch.is_grad_enabled() or x.shape[-2] <= BAND_ROWS else BAND_ROWS


def _empty_like(x: torch.Tensor, channels: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """An uninitialised [B, channels, height, width] tensor (default: x's size) in x's dtype, device and memory
    layout (channels_last or not)."""
    height, width = height or x.shape[-2], width or x.shape[-1]
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.empty(x.shape[0], channels, height, width, dtype=x.dtype, device=x.device, memory_format=layout)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision x (as PyTorch's own GroupNorm computes), else x's dtype."""
    return torch.promote_types(x.dtype, torch.float32)


def _group_norm_as_affine(norm: nn.GroupNorm, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm(x) for x [B, C, H, W] as the per-channel affine map it is: x·scale + shift, scale and shift
    [B, C, 1, 1] in float32 (float64 for float64 x). The statistics are those of the WHOLE of x, read `rows` rows at
    a time (each band summed in float32, the bands' sums added up in float64):

        μ_g  = mean of x over group g's channels and all pixels
        σ²_g = mean of (x − μ_g)²                      (a second pass: no cancellation, unlike E[x²] − μ²)
        GroupNorm(x) = (x − μ_g) / √(σ²_g + ε) · γ_c + β_c  =  x · scale_c + shift_c,
        scale_c = γ_c / √(σ²_g + ε),   shift_c = β_c − μ_g · scale_c     (c in group g)
    """
    batch, channels, height, _ = x.shape
    per_group = channels // norm.num_groups
    count = per_group * x[0, 0].numel()                                  # numbers in one group of one sample

    def group_mean(per_channel_sums: torch.Tensor) -> torch.Tensor:      # [B, C] → [B, C, 1, 1], float64
        sums = per_channel_sums.view(batch, norm.num_groups, per_group).sum(-1, keepdim=True) / count
        return sums.expand(-1, -1, per_group).reshape(batch, channels, 1, 1)

    dtype = _compute_dtype(x)

    def bands():  # x, `rows` rows at a time: views (band-sized float32 copies for half precision)
        return (x[:, :, r:r + rows].to(dtype) for r in range(0, height, rows))

    mean = group_mean(sum(band.sum(dim=(2, 3)).double() for band in bands()))                  # μ_g
    var = group_mean(sum((band - mean.to(dtype)).square_().sum(dim=(2, 3)).double() for band in bands()))  # σ²_g
    scale = norm.weight.double()[:, None, None] * (var + norm.eps).rsqrt()
    shift = norm.bias.double()[:, None, None] - mean * scale
    return scale.to(dtype), shift.to(dtype)


def _normalised_rows(norm: nn.GroupNorm, x: torch.Tensor, rows: int):
    """The rows of SiLU(GroupNorm(x)) on demand: a function (a, b) → rows a…b−1 [B, C, b − a, W], x's dtype.
    The statistics are computed once, here, from all of x."""
    scale, shift = _group_norm_as_affine(norm, x, rows)
    return lambda a, b: F.silu((x[:, :, a:b].to(scale.dtype) * scale).add_(shift), inplace=True).to(x.dtype)


def _upsampled_rows(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows a…b−1 of x [B, C, H, W] upsampled ×2 by nearest neighbour (row i copies row i // 2): [B, C, b − a, 2W]."""
    first = a // 2
    up = F.interpolate(x[:, :, first:(b + 1) // 2], scale_factor=2.0, mode="nearest")  # rows 2·first … b (or b − 1)
    return up[:, :, a - 2 * first:b - 2 * first]


def _conv3x3_in_bands(conv: nn.Conv2d, input_rows, out: torch.Tensor, rows: int, residual=None) -> torch.Tensor:
    """out = conv(input) (+ residual), `rows` output rows at a time; returns out [B, C_out, H, W].

    input_rows(a, b) gives rows a…b−1 of the conv's input [B, C_in, b − a, W] (made on demand: normalised,
    activated, upsampled …); residual(r0, r1), if given, rows r0…r1−1 of a tensor to add. Band r0…r1−1's result
    is stored one step late: by then the next band has read its halo row r1 − 1, and every band after that reads
    rows ≥ r1 only. So input_rows may read from `out` itself (the ResBlock's conv2 writes into conv1's output).
    """
    if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1):
        raise ValueError(f"_conv3x3_in_bands needs a 3×3 conv with padding 1 and stride 1, got {conv}")
    height = out.shape[-2]
    pending = None                                                # (r0, r1, result) of the band not yet stored
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        a, b = max(r0 - 1, 0), min(r1 + 1, height)                # the input rows it reads, inside the image
        band = input_rows(a, b)
        if (a, b) != (r0 - 1, r1 + 1):                           # at the top/bottom edge: + the conv's zero rows
            band = F.pad(band, (0, 0, a - (r0 - 1), r1 + 1 - b))
        result = F.conv2d(band, conv.weight, conv.bias, padding=(0, 1))   # [B, C_out, r1 − r0, W]
        if residual is not None:
            result += residual(r0, r1)
        if pending is not None:
            out[:, :, pending[0]:pending[1]] = pending[2]
        pending = (r0, r1, result)
    out[:, :, pending[0]:pending[1]] = pending[2]
    return out


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
        h = self.conv_in(x)
        for level in self.levels:  # H → H/2 → H/4 → H/8
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


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
        h = self.mid(self.conv_in(z))
        # h → 2h → 4h → 8h, as one flat loop over the blocks: a loop `h = level(h)` would keep each level's input
        # alive until the whole level had run (at 512², the last upsample's 256 MiB output beside everything after it)
        for block in [block for level in reversed(self.levels) for block in level.blocks()]:
            if _rows_per_band(h) is not None:
                release_freed_memory()  # the previous blocks' freed bands, before this block's allocations
            h = block(h)
        rows = _rows_per_band(h)
        if rows is None:
            return self.conv_out(F.silu(self.norm_out(h), inplace=True))
        return _conv3x3_in_bands(self.conv_out, _normalised_rows(self.norm_out, h, rows),
                                 _empty_like(h, self.conv_out.out_channels), rows)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of length `tile` covering 0…size with at least `overlap` shared between neighbours; the
    last tile is moved back to end at `size` (so every tile has full length)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, band: int, fade_start: bool, fade_end: bool, like: torch.Tensor) -> torch.Tensor:
    """A 1-D blending weight [length]: 1, with a linear ramp over the first/last `band` pixels when that side
    meets a neighbouring tile. The ramp runs from 1/(band+1) up to band/(band+1): never 0, so every pixel keeps
    some weight even where the last tile overlaps its neighbour by more than `band`."""
    ramp = torch.ones(length, dtype=like.dtype, device=like.device)
    band = min(band, length // 2)
    if band > 0:
        up = torch.arange(1, band + 1, dtype=like.dtype, device=like.device) / (band + 1)
        if fade_start:
            ramp[:band] = up
        if fade_end:
            ramp[length - band:] = up.flip(0)
    return ramp


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

    def decode(self, z: torch.Tensor, tile: int | None = None, overlap: int = 8) -> torch.Tensor:
        """z [B, 4, h, w] (unscaled latents) → x̂ [B, 3, 8h, 8w], roughly in [−1, 1]; not clamped.

        `tile` (latent pixels, optional): decode tile × tile pieces of z that overlap by `overlap` latent pixels and
        blend them (`decode_tiled`). Peak memory then follows the tile, not the image, at the price of a small
        difference from the plain decode (the decoder's GroupNorms and its attention see one tile at a time).
        """
        if tile is not None and (tile < z.shape[-2] or tile < z.shape[-1]):
            return self.decode_tiled(z, tile, overlap)
        return self.decoder(self.latent_conv(z))

    def decode_tiled(self, z: torch.Tensor, tile: int, overlap: int = 8) -> torch.Tensor:
        """Decode z [B, 4, h, w] in overlapping tiles of tile × tile latent pixels and blend them:

            x̂ = Σ_k m_k ⊙ D(z_k) / Σ_k m_k

        where z_k is the k-th tile (placed at its offset) and m_k its blending mask: 1 inside, falling linearly to
        0 across the `overlap` band on every side that has a neighbouring tile, so that seams fade rather than cut.
        A single tile covering z gives exactly decode(z).
        """
        if not 0 <= overlap < tile:
            raise ValueError(f"decode_tiled: need 0 ≤ overlap < tile, got overlap={overlap}, tile={tile} "
                             "(latent pixels; e.g. tile=32, overlap=8 for 256-pixel tiles)")
        f = self.config.downsample_factor                                  # 8 image pixels per latent pixel
        height, width = z.shape[-2:]
        rows, cols = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
        out = weight = None
        for top in rows:
            for left in cols:
                piece = self.decoder(self.latent_conv(z[:, :, top:top + tile, left:left + tile]))
                mask = (_ramp(piece.shape[-2], f * overlap, top > 0, top + tile < height, piece)[:, None]
                        * _ramp(piece.shape[-1], f * overlap, left > 0, left + tile < width, piece)[None, :])
                if out is None:
                    out = piece.new_zeros(*piece.shape[:2], f * height, f * width)
                    weight = piece.new_zeros(f * height, f * width)
                window = (slice(f * top, f * top + piece.shape[-2]), slice(f * left, f * left + piece.shape[-1]))
                out[..., window[0], window[1]] += piece * mask                # Σ m_k ⊙ D(z_k)
                weight[window] += mask                                        # Σ m_k  (> 0 everywhere)
                del piece                                                     # free the tile before the next
        return out / weight

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction x̂ = decode(z), z ~ q(z|x)."""
        return self.decode(self.encode(x).sample(generator))
