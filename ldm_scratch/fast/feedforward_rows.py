"""The transformer's feed-forward in blocks of rows at inference: the same numbers, without 42 MB temporaries.

    a, g = split(x W_1 + b_1),   out = (a ⊙ GELU(g)) W_2 + b_2     (spatial_transformer.GEGLUFeedForward)

Every row (token) of x goes through these equations on its own, so x [M, C] can be cut into blocks of rows, each
block computed as the whole would be and written into its rows of the output: out[i] depends on x[i] only.

Why: glibc's malloc gives any request above its mmap threshold (at most 32 MiB on 64-bit Linux) fresh pages from
the kernel and hands them back on free, so every page of such a buffer faults on its first write, at every call.
The GEGLU's hidden layer x W_1 + b_1 is the UNet's largest temporary: [2, 4096, 2560] at 512² with CFG, 42 MB in
bfloat16 (84 MB in float32). Measured here (2 cores, bfloat16, packed weights): that product alone,
[8192, 320] × [320, 2560], took 72 ms as one call and 36 ms when the allocator was told to keep its memory
(GLIBC_TUNABLES mmap_threshold/trim_threshold); touching a fresh 42 MB buffer costs 18 ms. Where the hidden layer
is over 32 MiB, blocks whose hidden layer stays under `BLOCK_BYTES` (16 MiB) let the allocator reuse the same
memory block after block: the minor page faults of a whole bf16 UNet step went from 51,205 to 0.

What that buys is small: the level-1 feed-forward, 83 → 68 ms (bfloat16, packed; medians of 12 interleaved calls),
≈ 75 ms of a ≈ 6.5 s step (1 %); in float32 240 → 199 ms, ≈ 0.2 s of the step (2 %). On the day it was measured
whole-step timings moved by ±15 % from call to call, and two sets of 10 interleaved pairs gave paired ratios of
0.948 and 1.001: the gain is below that noise. Re-run with `python3 scripts/feedforward_faults.py` (a later run,
4 pairs: faults 51,188 → 640 per step, level-1 FF 71 → 63 ms, paired ratio 0.966). Outputs were bit-identical to
the one-call path here (bfloat16 and float32: oneDNN and MKL gave each row the same result whatever the number of
rows).

Blocks are equal (M cut in 2, 4, 8 … parts) so that a packed linear layer (prepack.py), whose packed weight is
made for one row count, packs once; a row count that does not halve evenly is left as one call. With autograd
recording (training) the plain forward runs: the blocks would keep every block's graph anyway.
"""
from __future__ import annotations

import torch
from torch import nn

from ..spatial_transformer import GEGLUFeedForward
from .switch import switch_class

__all__ = ["RowBlockFeedForward", "use_feedforward_rows", "row_blocks", "BLOCK_BYTES", "MMAP_MAX"]

MMAP_MAX = 32 * 2**20       # glibc's mmap threshold rises to at most this (64-bit; memory.py): larger requests fault
BLOCK_BYTES = 16 * 2**20     # a block's hidden layer: half of it, well inside what the allocator keeps


def row_blocks(rows: int, bytes_per_row: int, limit: int = BLOCK_BYTES, reused: int = MMAP_MAX) -> int:
    """How many equal blocks to cut `rows` into: 1 while the hidden layer rows·bytes_per_row fits in `reused`
    (the allocator keeps such a buffer: smaller blocks would only cost the matrix product efficiency), else the
    fewest halvings (2, 4, …) that bring a block to ≤ limit, stopping where rows no longer halve evenly."""
    blocks = 1
    if rows * bytes_per_row <= reused:
        return blocks
    while rows * bytes_per_row > blocks * limit and rows % (2 * blocks) == 0:
        blocks *= 2
    return blocks


class RowBlockFeedForward(GEGLUFeedForward):
    """GEGLUFeedForward computed in equal blocks of rows at inference (module docstring); same parameters."""

    block_bytes, reused_bytes = BLOCK_BYTES, MMAP_MAX

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # x [B, N, C] → [B, N, C]
        rows = x.reshape(-1, x.shape[-1])                           # [M, C]: B·N tokens, each on its own
        hidden = self.geglu.out_features * x.element_size()         # bytes of one row of x W_1 + b_1 [M, 2·4C]
        blocks = row_blocks(rows.shape[0], hidden, self.block_bytes, self.reused_bytes)
        if blocks == 1 or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        out = rows.new_empty(rows.shape[0], self.out.out_features)  # [M, C]
        for block_rows, block_out in zip(rows.chunk(blocks), out.chunk(blocks)):
            block_out.copy_(super().forward(block_rows))            # out[i] = FF(x[i]): rows never mix
        return out.reshape(*x.shape[:-1], out.shape[-1])


def use_feedforward_rows(network: nn.Module, on: bool = True) -> nn.Module:
    """Switch every GEGLUFeedForward of network to RowBlockFeedForward (on=False: back), in place, the class only;
    parameters and state_dict keys do not change. Returns network."""
    return switch_class(network, GEGLUFeedForward, RowBlockFeedForward, on)
