"""Row bands: the VAE's numbers in less memory, for inference at large sizes.

`use_row_bands(vae)` switches a `vae.VAE`'s ResBlocks, Upsamples and Decoder to the subclasses below (the same
parameters, another `forward`). Without autograd, and on inputs taller than BAND_ROWS rows, those run in bands of
rows; otherwise they run the plain code of vae.py.

Run plainly at 512², the decoder's first ResBlock at full resolution holds its input [1, 256, 512, 512] (256 MiB),
GroupNorm's output (256 MiB) and conv1's output [1, 128, 512, 512] (128 MiB) at once, and the upsample before it
holds the nearest-neighbour copy [1, 256, 512, 512] beside its conv's output (256 MiB each). The intermediates
are not needed whole:

- a 3×3 convolution with padding 1 is local: output rows r0…r1−1 read input rows r0−1…r1 only (one halo row on
  each side; beyond the image's top and bottom edges, zeros: the conv's own padding);
- GroupNorm is not local (every output depends on its group's mean and variance over the whole image), but once
  those statistics are known it is a per-channel affine map, GroupNorm(x) = x·scale + shift, that any rows can
  be put through on their own. So the statistics are computed first, over all of x, and the rows after.

Without autograd, a large layer therefore runs BAND_ROWS output rows at a time: make rows r0−1…r1 of the conv's
input (normalise and SiLU them, or upsample them), pad the image edges with zero rows, convolve, and write the
result into rows r0…r1−1 of a preallocated output. Only band-sized temporaries exist. A ResBlock writes conv2's
result (+ skip(x)) back into conv1's output, so it holds its input and one output-sized tensor: 256 + 128 MiB
for the block above (plain: up to 640), 64 + 256 MiB for the upsample (plain: 576).

Exactness: the band's convolution does the same multiply-adds in the same order as the whole one (bit for bit
equal on CPU, measured); GroupNorm's statistics are summed in another order (two passes, bands added up in
float64), so results differ from the plain layers by rounding only (tests/test_fast.py). At full size they are
the more exact ones: PyTorch's CPU GroupNorm on channels_last tensors (the decoder's are, from the mid block's
attention on, whatever the model's layout) sums its statistics in one float32 pass, off by up to 5·10⁻⁵ for a
512² group. Decoding 512² with random SD v1 weights, max |x̂ − x̂_float64| was 2.3·10⁻⁴ with the plain layers and
1.5·10⁻⁵ in bands (diffusers: 3.4·10⁻⁶).
Training keeps the plain code: backward keeps the activations anyway, so bands would save nothing there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..vae import Decoder, ResBlock, Upsample
from .memory import release_freed_memory

BAND_ROWS = 64   # output rows per band: at 512 pixels wide, 64 rows of 128 channels are 16 MiB in float32. Why 64:
                 # every band is a few more small operations, and each operation ends with its threads waiting
                 # for one another. On a quiet machine that costs little (16 rows was as fast as the plain
                 # layers), but with another process on one of the 2 cores, the thread sharing that core is
                 # descheduled for milliseconds at a time and every small operation waits for it: decode 512²
                 # took 33.1 s with 16 rows, 25.2 s with 64, 25.5 s with 128, against diffusers' 25.7 s
                 # (medians of 2 after a warm-up, interleaved, one competing process; scripts/benchmark.py
                 # --busy 1). 64 rows is 8 bands at 512², 4 at 256², 2 at 128².


BANDED_FROM_ROWS = 512   # only layers whose OUTPUT is at least this tall run in bands: at 512² the decoder's
                         # last level and the upsample into it (where the 128–256 MiB tensors are). The levels
                         # below hold a quarter of that or less, and banding them too cost time on a busy machine
                         # for no memory: the decode's peak is at the last level either way.


def _rows_per_band(layer: nn.Module, x: torch.Tensor) -> int | None:
    """BAND_ROWS when `layer` on x [B, C, H, W] should run in row bands (no autograd, an output ≥ BANDED_FROM_ROWS
    rows tall — an Upsample's is 2H, any other layer's H — and more than one band); else None."""
    out_rows = 2 * x.shape[-2] if isinstance(layer, Upsample) else x.shape[-2]
    banded = not torch.is_grad_enabled() and out_rows >= BANDED_FROM_ROWS and x.shape[-2] > BAND_ROWS
    return BAND_ROWS if banded else None


# ---------------------------------------------------------------------------------------------------------------
# The banded layers
# ---------------------------------------------------------------------------------------------------------------

class BandedResBlock(ResBlock):
    """vae.ResBlock, in row bands at inference. Alive at once: x and one tensor of the output's size, h, plus
    band-sized pieces; conv2's result (+ skip(x)) is written back into h band by band."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows_per_band(self, x)
        if rows is None:
            return super().forward(x)
        h = _conv3x3_in_bands(self.conv1, _normalised_rows(self.norm1, x, rows),
                              _empty_like(x, self.conv1.out_channels), rows)
        return _conv3x3_in_bands(self.conv2, _normalised_rows(self.norm2, h, rows), h, rows,
                                 residual=lambda r0, r1: self.skip(x[:, :, r0:r1]))


class BandedUpsample(Upsample):
    """vae.Upsample, in row bands at inference: the 4×-size nearest-neighbour copy [B, C, 2h, 2w] is never made,
    only a band of it at a time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows_per_band(self, x)
        if rows is None:
            return super().forward(x)
        batch, channels, height, width = x.shape
        return _conv3x3_in_bands(self.conv, lambda a, b: _upsampled_rows(x, a, b),
                                 _empty_like(x, channels, 2 * height, 2 * width), rows)


class BandedDecoder(Decoder):
    """vae.Decoder at inference: its blocks as one flat loop, freed memory handed back to the OS before each banded
    block, and the output layer (GroupNorm, SiLU, conv_out) in row bands."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(z)
        h = self.mid(self.conv_in(z))
        # h → 2h → 4h → 8h, as one flat loop over the blocks: a loop `h = level(h)` would keep each level's input
        # alive until the whole level had run (at 512², the last upsample's 256 MiB output beside everything after it)
        for block in [block for level in reversed(self.levels) for block in _blocks(level)]:
            if _rows_per_band(block, h) is not None:
                release_freed_memory()  # the previous blocks' freed bands, before this block's allocations
            h = block(h)
        rows = _rows_per_band(self.conv_out, h)
        if rows is None:
            return self.conv_out(F.silu(self.norm_out(h), inplace=True))
        return _conv3x3_in_bands(self.conv_out, _normalised_rows(self.norm_out, h, rows),
                                 _empty_like(h, self.conv_out.out_channels), rows)


def _blocks(level: nn.Module) -> list[nn.Module]:
    """A vae.DecoderLevel's blocks in the order its forward runs them: ResBlocks, then the upsample if any."""
    return [*level.res_blocks] + ([level.upsample] if level.upsample is not None else [])


BANDED = {ResBlock: BandedResBlock, Upsample: BandedUpsample, Decoder: BandedDecoder}   # plain class → banded one


def use_row_bands(vae: nn.Module) -> nn.Module:
    """Switch vae's plain ResBlocks, Upsamples and Decoder to their banded classes, in place; returns vae.

    Only the class changes (`module.__class__`), so parameters, state_dict keys, `.to()`, deepcopy and torch.save
    behave as before. Modules of any other class (already banded, or a subclass someone else wrote) are left
    alone, so calling it twice is harmless."""
    for module in vae.modules():
        banded = BANDED.get(type(module))
        if banded is not None:
            module.__class__ = banded
    return vae


# ---------------------------------------------------------------------------------------------------------------
# The pieces: GroupNorm as an affine map, upsampled rows, a 3×3 conv band by band
# ---------------------------------------------------------------------------------------------------------------

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
