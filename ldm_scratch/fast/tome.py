"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023): fewer tokens into self-attention.

Neighbouring latent pixels are often nearly the same token. Before a transformer block's self-attention,
r = ⌊ratio·N⌋ of its N tokens are merged into similar ones (bipartite soft matching), attention runs on the N − r
that are left, and the result is copied back to every token that was merged ("unmerge"), so the block's output
keeps all N:

    x ← x + U(SelfAttention(M(LN(x))))          M: [B, N, C] → [B, N − r, C],  U: back to [B, N, C]
    (cross-attention and the MLP unmerged: the package's defaults merge_crossattn = merge_mlp = False)

Bipartite soft matching (ToMe, Bolya et al. 2023, §3), on the block's input x as the similarity metric:
  1. dst: one token per sy × sx cell of the h × w token grid, its top-left one (the package with use_rand=False;
     rows/columns left over when sy, sx do not divide h, w are all src); src: every other token.
  2. each src token a finds its most similar dst token b(a) by cosine similarity  s_a = max_b cos(x_a, x_b).
  3. the r src tokens with the largest s_a are merged: each dst becomes the mean of itself and the src merged into
     it; the other src tokens stay as they are.  Output order: [unmerged src …, dst …].
  4. unmerge: every dst position gets its (attended) dst token, each merged src the token of its dst.

Only blocks at most `max_downsample` times smaller than the latent are merged (the package's default 1: the top
level of the encoder and decoder, where N = h·w is largest and attention costs O(N²)). Its downsampling is read from
the token count as the package does: ⌈√(h·w // N)⌉. For SD v1 at 512² (4096 tokens at the top level) ratio 0.5
leaves 90 % of the UNet's FLOPs (88 % with max_downsample 2; torch.utils.flop_counter): the merged self-attention
is a small part of the FLOPs, the saving is mostly memory traffic, larger on GPUs than on CPUs.

`TokenMergedUNet(unet, ratio)` has the UNet's signature; for the length of one call it gives the UNet's transformer
blocks the merged forward (instance attributes, restored after), so unet.py is unchanged. Matches
`tomesd.apply_patch(pipe, ratio, use_rand=False)` on diffusers (tests/test_tome.py).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..spatial_transformer import TransformerBlock


def _keep(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class MergeOptions:
    """tomesd.apply_patch's arguments (use_rand=False: the deterministic choice of dst tokens)."""
    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) \
                or not 0 <= self.ratio <= 1 - 1 / (self.sx * self.sy):
            raise ValueError(f"tome_ratio must be a number in [0, {1 - 1 / (self.sx * self.sy):g}] (the fraction of "
                             f"tokens merged: at most all but one per {self.sy}×{self.sx} cell; 0.5 is the paper's "
                             f"choice), got {self.ratio!r}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"max_downsample must be 1, 2, 4 or 8, got {self.max_downsample!r}")


def dst_positions(h: int, w: int, sx: int, sy: int) -> torch.Tensor:
    """Mask [h·w] (raster order): True for the top-left token of every whole sy × sx cell."""
    rows = torch.arange(h)[:, None]
    cols = torch.arange(w)[None, :]
    whole = (rows < h // sy * sy) & (cols < w // sx * sx)
    return (whole & (rows % sy == 0) & (cols % sx == 0)).reshape(-1)


def bipartite_soft_matching(metric: torch.Tensor, h: int, w: int, r: int, sx: int = 2,
                            sy: int = 2) -> tuple[Callable, Callable]:
    """(merge, unmerge) for tokens metric [B, N = h·w, C]: merge [B, N, C'] → [B, N − r, C'], unmerge back."""
    B, N, _ = metric.shape
    is_dst = dst_positions(h, w, sx, sy)              # on the CPU: the grid is known without looking at the data
    dst_idx, src_idx = (i.nonzero().squeeze(1).to(metric.device) for i in (is_dst, ~is_dst))   # [N_dst], [N_src]
    r = min(r, src_idx.numel())
    if r <= 0:
        return _keep, _keep
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, src_idx] @ unit[:, dst_idx].transpose(1, 2)       # [B, N_src, N_dst] cosine similarity
        best, best_dst = scores.max(dim=-1)                                 # s_a and b(a), [B, N_src]
        order = best.argsort(dim=-1, descending=True)                       # most similar src first
        merged, kept = order[:, :r], order[:, r:]                           # [B, r], [B, N_src − r]
        into = best_dst.gather(1, merged)                                   # [B, r]: the dst each merged src joins
        kept_pos, merged_pos = src_idx[kept], src_idx[merged]               # positions in the h·w grid

    def rows(index: torch.Tensor, c: int) -> torch.Tensor:
        return index[..., None].expand(*index.shape, c)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        src, dst = x[:, src_idx], x[:, dst_idx]
        dst = dst.scatter_reduce(1, rows(into, c), src.gather(1, rows(merged, c)), reduce="mean")  # dst and its src
        return torch.cat([src.gather(1, rows(kept, c)), dst], dim=1)       # [B, N − r, c]

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        c, n_kept = y.shape[-1], kept.shape[1]
        unmerged, dst = y[:, :n_kept], y[:, n_kept:]
        out = y.new_empty(y.shape[0], N, c)
        out[:, dst_idx] = dst
        out.scatter_(1, rows(kept_pos, c), unmerged)
        out.scatter_(1, rows(merged_pos, c), dst.gather(1, rows(into, c)))  # a merged token: its dst's result
        return out

    return merge, unmerge


def merged_forward(block: TransformerBlock, options: MergeOptions, size: tuple[int, int]):
    """The forward of `block` with ToMe, for a latent of `size` (h, w): TransformerBlock.forward's three residual
    steps, each sublayer wrapped in merge/unmerge as `options` say."""
    def forward(x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        m, u = _merging(x, options, size)
        m_a, u_a = (m, u) if options.merge_attn else (_keep, _keep)
        m_c, u_c = (m, u) if options.merge_crossattn else (_keep, _keep)
        m_m, u_m = (m, u) if options.merge_mlp else (_keep, _keep)
        x = u_a(block.self_attn(m_a(block.norm1(x)))) + x
        x = u_c(block.cross_attn(m_c(block.norm2(x)), context)) + x
        return u_m(block.ff(m_m(block.norm3(x)))) + x
    return forward


def _merging(x: torch.Tensor, options: MergeOptions, size: tuple[int, int]) -> tuple[Callable, Callable]:
    """(merge, unmerge) for this block's tokens x [B, N, C], or identities if its level is too deep."""
    h, w = size
    downsample = math.ceil(math.sqrt(h * w // x.shape[1]))       # 1 at the top level, 2 one level down, …
    if downsample > options.max_downsample:
        return _keep, _keep
    grid_h, grid_w = math.ceil(h / downsample), math.ceil(w / downsample)
    return bipartite_soft_matching(x, grid_h, grid_w, int(x.shape[1] * options.ratio), options.sx, options.sy)


@contextmanager
def merging_tokens(unet: nn.Module, options: MergeOptions, size: tuple[int, int]):
    """Inside the block, every TransformerBlock of `unet` runs with ToMe for a latent of `size`; restored after."""
    blocks = [m for m in unet.modules() if isinstance(m, TransformerBlock)]
    saved = [m.__dict__.get("forward") for m in blocks]
    try:
        for block in blocks:
            block.forward = merged_forward(block, options, size)
        yield
    finally:
        for block, forward in zip(blocks, saved):
            block.__dict__.pop("forward", None)
            if forward is not None:
                block.forward = forward


def _network(model) -> nn.Module:
    """The UNet inside a wrapper (DeepCachedUNet, control.ControlledUNet: each keeps it as `.unet`)."""
    while not isinstance(model, nn.Module):
        model = model.unet
    return model


class TokenMergedUNet:
    """unet(x, t, context, **kw) with token merging in the UNet's transformer blocks. `model`: the UNet or a
    wrapper with its signature (DeepCachedUNet, ControlledUNet); a ControlNet's own blocks stay unmerged."""

    def __init__(self, model, ratio: float, **options):
        self.unet, self.options = model, MergeOptions(ratio, **options)

    def __call__(self, x: torch.Tensor, t, context: torch.Tensor, **kw) -> torch.Tensor:
        with merging_tokens(_network(self.unet), self.options, tuple(x.shape[-2:])):
            return self.unet(x, t, context, **kw)
