"""The UNet's transformer: attention over the latent's pixels and over the prompt (Rombach et al. 2022, §3.3).

    SpatialTransformer: x [B, C, h, w], context [B, 77, D] → [B, C, h, w]

Every pixel of a feature map becomes a token; self-attention lets pixels exchange information across the whole
image, cross-attention lets each pixel (a query) read the prompt's tokens (keys and values) — the only place the
text steers the image. Used by unet.py at the levels with attention and in the middle block (and, through the
UNet's blocks, by ControlNet).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout x is stored in. `unet.to(memory_format=torch.channels_last)` makes every activation [B, C, h, w]
    live as [B, h, w, C] in memory (faster convolutions and GroupNorms on CPU, measured in scripts/benchmark.py);
    the forward keeps whichever layout it is given instead of converting back and forth."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class Attention(nn.Module):
    """Multi-head attention: queries from x [B, N, C], keys and values from `context` [B, M, D] (x itself when
    None: self-attention).  out = to_out(softmax(Q Kᵀ / √d_head) V), Q = x W_q, K = context W_k, V = context W_v.
    The projections have no bias (as trained); to_out does.

    upcast: compute softmax(Q Kᵀ / √d) V in float32 when the model runs in float16/bfloat16. SD 2.1's attention
    scores can exceed float16's largest number (65,504), and the 768-v model then makes NaN (black) images in half
    precision — why diffusers' SD 2.1 config sets `upcast_attention` (CompVis: ATTN_PRECISION = "fp32"). Only the
    attention itself is upcast; the projections stay in the model's dtype. A no-op in float32."""

    def __init__(self, dim: int, n_heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        context_dim = context_dim or dim
        self.n_heads, self.upcast = n_heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self._upcast(self.to_q(x), self.to_k(context), self.to_v(context))
        return self.to_out(attention(q, k, v, self.n_heads, layer=self).to(x.dtype))

    def _upcast(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            return q.float(), k.float(), v.float()
        return q, k, v


class GEGLUFeedForward(nn.Module):
    """The transformer's MLP with a gated GELU (Shazeer 2020): [B, N, C] → [B, N, C] through 4C hidden units.

        a, g = split(x W_1 + b_1)        (W_1: C → 2·4C, split in halves along channels)
        out  = (a ⊙ GELU(g)) W_2 + b_2
    """

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.geglu = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.geglu(x).chunk(2, dim=-1)
        return self.out(F.gelu(gate).mul_(a))                        # a ⊙ GELU(g), into GELU's fresh output


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block over the latent's pixels as tokens, x [B, h·w, C]:

        x = x + SelfAttention(LN(x))              pixels exchange information across the whole image
        x = x + CrossAttention(LN(x), context)    each pixel (query) reads the prompt tokens (keys/values):
                                                  the only place the text steers the image
        x = x + GEGLU-FeedForward(LN(x))

    self_attends=False (the ×4 upscaler's `disable_self_attn`, diffusers' `only_cross_attention`): the first
    attention takes its keys and values from the context as well, x = x + Attention₁(LN(x), context), so the
    block cross-attends twice (with two sets of weights) and pixels never attend to each other there — the
    quadratic cost in h·w is gone at the high-resolution levels of a 512² output.
    """

    def __init__(self, dim: int, n_heads: int, context_dim: int, upcast: bool = False, self_attends: bool = True):
        super().__init__()
        self.self_attends = self_attends
        self.norm1 = nn.LayerNorm(dim)
        # self_attends=False: the first attention reads the context too (its K, V are [C, D] projections)
        self.self_attn = Attention(dim, n_heads, None if self_attends else context_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, n_heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # residuals added into each sublayer's fresh output (x + f(x) = f(x) + x exactly; one buffer fewer)
        x = self.self_attn(self.norm1(x), None if self.self_attends else context).add_(x)
        x = self.cross_attn(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """Transformer blocks applied to a feature map, with a residual around the whole thing:

        h = proj_in(GroupNorm(x))                          1×1 conv (SD v1), [B, C, h, w]
        h = rearrange(h, "b c h w -> b (h w) c")           every pixel becomes a token
        h = TransformerBlock(h, context)  × depth
        out = x + proj_out(rearrange(h, "b (h w) c -> b c h w"))

    x [B, C, h, w], context [B, 77, D] → [B, C, h, w].

    linear=True (SD 2, `use_linear_in_transformer`): proj_in and proj_out are Linear layers [C, C] applied to the
    tokens, after the rearrange and before the way back. A 1×1 convolution is the same map on every pixel, so this
    is the same function with the weights stored as [C, C] instead of [C, C, 1, 1].
    """

    def __init__(self, channels: int, n_heads: int, context_dim: int, depth: int = 1, groups: int = 32,
                 linear: bool = False, upcast: bool = False, self_attends: bool = True):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(TransformerBlock(channels, n_heads, context_dim, upcast, self_attends)
                                    for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.linear:
            return self._forward_linear(x, context)
        height, width = x.shape[-2:]
        # every pixel becomes a token; a free view when x is channels_last (already stored as [B, h, w, C])
        h = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        for block in self.blocks:
            h = block(h, context)
        # back to [B, C, h, w], stored in x's memory layout so that proj_out and the residual need no conversion
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width).contiguous(memory_format=memory_format(x))
        return self.proj_out(h).add_(x)                              # x + proj_out(h)

    def _forward_linear(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """SD 2's order: GroupNorm → tokens → Linear proj_in → blocks → Linear proj_out → back to [B, C, h, w]."""
        height, width = x.shape[-2:]
        h = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        for block in self.blocks:
            h = block(h, context)
        h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=height, w=width)
        return h.contiguous(memory_format=memory_format(x)).add_(x)     # x + proj_out(h)
