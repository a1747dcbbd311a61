"""The one attention function shared by the text encoder, the UNet and the VAE.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_head) V                      (Vaswani et al. 2017, eq. 1)

computed per head with PyTorch's fused `scaled_dot_product_attention` (SDPA), which never materialises the
[B, heads, N, M] score matrix when a memory-efficient kernel is available.

Shapes: q [B, N, C], k and v [B, M, C] with C = n_heads · d_head  →  output [B, N, C].

Attention slicing (optional, for small memory): each query row's softmax involves only that row, so the queries
can be processed `chunk` at a time and the results stacked — the same numbers, with at most [B, heads, chunk, M]
scores alive at once where a kernel would otherwise materialise all N × M of them (e.g. SDPA's plain "math" path
on some GPUs: 2 · 8 · 4096² floats = 1 GiB for the UNet's first level at 512²). Turn it on for every call with
`set_attention_slicing(chunk)` or per call with `chunk=`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

_default_chunk: int | None = None   # set by set_attention_slicing(); None: all queries at once


def set_attention_slicing(chunk: int | None) -> None:
    """Process queries `chunk` at a time in every attention call that passes no `chunk=` (None: off)."""
    global _default_chunk
    if chunk is not None and chunk < 1:
        raise ValueError(f"attention slicing chunk must be a positive number of queries or None, got {chunk}")
    _default_chunk = chunk


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int,
              causal: bool = False, chunk: int | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention on already-projected q, k, v.

    q: [B, N, C], k/v: [B, M, C] → [B, N, C]. `causal=True` lets token i attend only to tokens ≤ i
    (the CLIP text transformer is a causal language model). `chunk`: queries per slice (default: the value of
    `set_attention_slicing`, normally None = no slicing).
    """
    chunk = chunk if chunk is not None else _default_chunk
    # split the channels into heads: [B, N, heads·d] → [B, heads, N, d] (views, no copies)
    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=n_heads) for x in (q, k, v))
    n_queries = q.shape[2]
    if chunk is None or chunk >= n_queries:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # softmax(QKᵀ/√d)·V per head
        return rearrange(out, "b h n d -> b n (h d)")

    # Sliced: write each slice into an output stored as [B, N, heads, d], so that the final merge of the heads
    # is a view rather than a copy.
    batch, heads, _, d_head = q.shape
    out = q.new_empty(batch, n_queries, heads, d_head)
    for start in range(0, n_queries, chunk):
        rows = slice(start, start + chunk)
        mask = None
        if causal:  # query i (absolute position start + r) sees keys j ≤ i
            positions = torch.arange(start, min(start + chunk, n_queries), device=q.device)
            mask = torch.arange(k.shape[2], device=q.device)[None, :] <= positions[:, None]
        out[:, rows] = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask).transpose(1, 2)
    return rearrange(out, "b n h d -> b n (h d)")
