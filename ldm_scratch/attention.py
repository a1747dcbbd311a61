"""The one attention function shared by the text encoder, the UNet and the VAE.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_head) V                      (Vaswani et al. 2017, eq. 1)

computed per head with PyTorch's fused `scaled_dot_product_attention` (SDPA), which never materialises the
[B, heads, N, M] score matrix when a memory-efficient kernel is available.

Shapes: q [B, N, C], k and v [B, M, C] with C = n_heads · d_head  →  output [B, N, C].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int,
              causal: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention on already-projected q, k, v.

    q: [B, N, C], k/v: [B, M, C] → [B, N, C]. `causal=True` lets token i attend only to tokens ≤ i
    (the CLIP text transformer is a causal language model).
    """
    # split the channels into heads: [B, N, heads·d] → [B, heads, N, d]
    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=n_heads) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # softmax(QKᵀ/√d)·V per head
    return rearrange(out, "b h n d -> b n (h d)")
