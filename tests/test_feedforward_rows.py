"""The UNet's feed-forward in blocks of rows at inference (ldm_scratch/fast/feedforward_rows.py): the same outputs as
the one-call GEGLUFeedForward, blocks as the rule says, plain autograd (install and load_pipeline: tests/test_fast.py).

Tolerance. Each row's result depends on that row alone, so only the matrix-product kernel could tell a block from
the whole: here oneDNN (bfloat16) and MKL (float32) gave bit-identical outputs for the SD v1 shapes. On another CPU
a library may pick another kernel for another row count, so the checks allow rounding-level differences
(torch.testing's defaults for the dtype) rather than claiming bit-equality.
"""
import pytest
import torch

from ldm_scratch.fast import prepack_weights
from ldm_scratch.fast.feedforward_rows import MMAP_MAX, RowBlockFeedForward, row_blocks, use_feedforward_rows
from ldm_scratch.spatial_transformer import GEGLUFeedForward

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("rows, bytes_per_row, blocks", [
    (8192, 2560 * 2, 4),          # SD v1 at 512², CFG, level 1, bfloat16: 42 MB → 4 × 10.5 MB
    (8192, 2560 * 4, 8),          # the same in float32: 84 MB → 8 × 10.5 MB
    (2048, 5120 * 2, 1),          # level 2, bfloat16: 21 MB, under 32 MiB: the allocator keeps it, one call
    (2048, 5120 * 4, 4),          # level 2, float32: 42 MB → 4 × 10.5 MB
    (512, 10240 * 4, 1),          # level 3, float32: 21 MB, one call
    (8450, 2560 * 2, 2),          # 2·65·65 rows halve once, then not: 2 blocks of 22 MB rather than unequal ones
    (MMAP_MAX, 1, 1),             # exactly at the allocator's limit: one call
    (MMAP_MAX + 4, 1, 4),         # just over it: blocks of ≤ 16 MiB
])
def test_row_blocks(rows, bytes_per_row, blocks):
    assert row_blocks(rows, bytes_per_row) == blocks


def feedforward(dtype, dim=16, seed=0) -> GEGLUFeedForward:
    torch.manual_seed(seed)
    return GEGLUFeedForward(dim).to(dtype).eval()


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocks_give_the_one_call_output(dtype, packed):
    ff = feedforward(dtype)
    x = torch.randn(2, 96, 16, generator=torch.Generator().manual_seed(1)).to(dtype)     # M = 192 rows
    with torch.inference_mode():
        whole = ff(x)
        if packed:
            prepack_weights(ff)
        use_feedforward_rows(ff)
        ff.block_bytes = 48 * ff.geglu.out_features * x.element_size()                 # 48 rows a block → 4
        ff.reused_bytes = ff.block_bytes                                                # (stand-ins for 16, 32 MiB)
        calls = []
        ff.geglu.register_forward_hook(lambda module, args, out: calls.append(args[0].numel() // 16))
        blocked = ff(x)
    assert calls == [48, 48, 48, 48]
    assert blocked.shape == whole.shape and blocked.dtype == dtype
    torch.testing.assert_close(blocked, whole)


def test_training_runs_the_one_call_forward():
    ff = use_feedforward_rows(feedforward(torch.float32).train())
    ff.block_bytes = ff.reused_bytes = 1                                                  # would block every row
    x = torch.randn(2, 8, 16, requires_grad=True)
    calls = []
    ff.geglu.register_forward_hook(lambda module, args, out: calls.append(args[0].numel() // 16))
    ff(x).square().sum().backward()
    assert calls == [16] and x.grad is not None and ff.geglu.weight.grad is not None
