"""bfloat16 self-attention in blocks of queries, as three plain operations: faster on CPU than the fused kernel.

    S = α · Q_b Kᵀ          (α = 1/√d_head; one matrix product, bfloat16 in, bfloat16 out)   [rows, M]
    P = softmax(S)          (per row; PyTorch accumulates it in float32 and rounds the result)  [rows, M]
    out_b = P V             (one matrix product)                                                [rows, d_head]

for each head and each block Q_b of `rows` queries: Attention(Q, K, V) = softmax(Q Kᵀ/√d) V row by row, since
query i's output depends on query i alone. A block's scores are ≤ SCORE_BYTES (4 MiB: 512 queries × 4096 keys at
the UNet's first level), so they never leave the allocator's reused memory (fast/memory.py) and stay in the
last-level cache.

Why: both libraries call PyTorch's CPU flash-attention kernel, and with SD v1's 40-channel heads it runs as slowly in
bfloat16 as in float32 (its products are small tiles, K = 40). The two plain products are large (512 × 40 × 4096)
and run at the machine's bfloat16 matrix rate. Measured here (`python3 scripts/attention_blocks.py`: [2, 8, N, d]
bfloat16, medians of 5 interleaved calls, 2 cores): N = M = 4096, d = 40: 411 → 243 ms; N = M = 1024, d = 80:
38 → 15 ms; N = M = 256, d = 160: 4.8 → 2.8 ms; the whole bfloat16 UNet step at 512² with CFG 4.38 → 3.49 s.
Cross-attention (M = 77 keys) gains little or loses (11.5 → 9.7 ms in that run, 10.1 → 10.5 in another at
N = 4096), so it keeps the kernel: only layers with at least MIN_KEYS keys take the blocks.

What it costs: the kernel keeps Q Kᵀ in float32 up to the softmax; here the scores are rounded to bfloat16 (8 bits
of mantissa) first, as in diffusers' classic AttnProcessor (`baddbmm` in the model's dtype) and PyTorch's math
path. The scores are sums of products of q and k, which are already bfloat16 (rounded to the same 8 bits) when they
come out of W_q and W_k; the README ("Fast on a CPU", bfloat16) gives the measured effect on the UNet's output and
the pictures. Only bfloat16 on the CPU takes this path: in float16 a score can overflow (SD 2.1,
`Attention.upcast`), in float32 the kernel is as fast, and a GPU's fused kernels are another matter. Hooked layers (editing/, `attention.hooks`), upcast layers and training (autograd
recording) run the plain Attention.forward.
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention import is_hooked
from ..spatial_transformer import Attention
from .switch import switch_class

__all__ = ["BlockedAttention", "use_attention_blocks", "blocked_attention", "query_rows", "SCORE_BYTES",
           "MIN_KEYS"]

SCORE_BYTES = 4 * 2**20   # one block's scores [rows, M] in bfloat16: 512 queries × 4096 keys
MIN_KEYS = 256            # fewer keys (cross-attention's 77): the fused kernel is as fast or faster


def query_rows(n_queries: int, n_keys: int, element_size: int = 2, limit: int = SCORE_BYTES) -> int:
    """Queries per block: as many as keep one block's scores [rows, n_keys] within `limit` bytes (at least 1)."""
    return max(1, min(n_queries, limit // (n_keys * element_size)))


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int,
                      rows: int | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ/√d) V per head, `rows` queries at a time (default `query_rows`).

    q [B, N, C], k and v [B, M, C] with C = n_heads · d  →  [B, N, C], in q's dtype.
    """
    batch, n_queries, channels = q.shape
    if channels % n_heads:
        raise ValueError(f"blocked_attention: {channels} channels do not split into {n_heads} heads")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"blocked_attention: rows must be a positive number of queries or None (the 4 MiB rule), "
                         f"got {rows!r}")
    d_head = channels // n_heads
    alpha = d_head ** -0.5                                          # α = 1/√d
    rows = rows or query_rows(n_queries, k.shape[1], q.element_size())
    # [B, N, heads, d] views: a head's queries (or keys) are a [N, d] matrix with row stride C, which the matrix
    # product reads as it is; Kᵀ is a transposed view, no copy.
    q, k, v = (x.unflatten(-1, (n_heads, d_head)) for x in (q, k, v))
    out = q.new_empty(batch, n_queries, n_heads, d_head)
    scores = q.new_empty(rows, k.shape[1])                         # S's memory, reused by every block of the call
    for b in range(batch):
        for h in range(n_heads):
            k_t, v_h = k[b, :, h].t(), v[b, :, h]                   # Kᵀ [d, M], V [M, d]
            for start in range(0, n_queries, rows):
                q_b = q[b, start:start + rows, h]                   # Q_b [rows, d]
                s = scores[:q_b.shape[0]]
                torch.addmm(s, q_b, k_t, beta=0, alpha=alpha, out=s)                        # S = α Q_b Kᵀ
                out[b, start:start + rows, h] = torch.softmax(s, dim=-1) @ v_h                  # softmax(S) V
    return out.flatten(-2)


class BlockedAttention(Attention):
    """Attention whose bfloat16 self-attention runs as `blocked_attention` at inference (module docstring); the
    same parameters. Everything else (cross-attention, other dtypes and devices, hooks, upcast, training) is
    Attention's.
    `min_keys` (class attribute, MIN_KEYS) can be lowered on an instance to put smaller layers on the blocks."""

    min_keys = MIN_KEYS

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        keys = x if context is None else context
        if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or self.upcast or keys.shape[1] < self.min_keys
                or is_hooked(self) or torch.is_grad_enabled()):    # training: autograd's plain path
            return super().forward(x, context)
        return self.to_out(blocked_attention(self.to_q(x), self.to_k(keys), self.to_v(keys), self.n_heads))


def use_attention_blocks(network: nn.Module, on: bool = True) -> nn.Module:
    """Switch every Attention of network to BlockedAttention (on=False: back), in place, the class only;
    parameters and state_dict keys do not change. Returns network."""
    return switch_class(network, Attention, BlockedAttention, on)
