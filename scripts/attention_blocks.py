"""What fast/attention_blocks.py buys and costs: bfloat16 attention as blocked products vs PyTorch's fused kernel.

    python3 scripts/attention_blocks.py [--repeats 5] [--pairs 6] [--error-steps 3]

1. Attention alone at SD v1's shapes at 512² with CFG ([2, 8, N, d]: self-attention at the three levels, and the
   first level's cross-attention), random q, k, v in bfloat16: medians of interleaved calls, kernel vs blocks.
2. Whole UNet steps on the full-size random weights (scripts/synthetic_checkpoint.py, loaded as scripts/benchmark.py
   loads them: load_pipeline, bfloat16, packed), interleaved in pairs: medians and the paired time ratio.
3. What the blocks cost in accuracy: the same UNet in float32 (the reference) and in bfloat16 with either path, on
   `--error-steps` inputs; the relative error ‖ε̂_bf16 − ε̂_fp32‖ / ‖ε̂_fp32‖ of each.
Numbers in the docstring of ldm_scratch/fast/attention_blocks.py and the README ("bfloat16 on a CPU").
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (its loader and synthetic weights)

from ldm_scratch.fast import use_attention_blocks  # noqa: E402
from ldm_scratch.fast.attention_blocks import blocked_attention  # noqa: E402

SHAPES = [(4096, 4096, 40, "level 1 self"), (1024, 1024, 80, "level 2 self"), (256, 256, 160, "level 3 self"),
          (4096, 77, 40, "level 1 cross")]                     # (queries N, keys M, d_head, what)


def attention_alone(repeats: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for n, m, d, what in SHAPES:
        q = torch.randn(2, n, 8 * d, generator=generator).bfloat16()
        k, v = (torch.randn(2, m, 8 * d, generator=generator).bfloat16() for _ in range(2))
        heads = [x.unflatten(-1, (8, d)).transpose(1, 2) for x in (q, k, v)]   # [B, heads, N, d] views
        calls = {"kernel": lambda: F.scaled_dot_product_attention(*heads),
                 "blocks": lambda: blocked_attention(q, k, v, 8)}
        times = {name: [] for name in calls}
        for name, call in calls.items():
            call()
        for _ in range(repeats):
            for name, call in calls.items():
                times[name].append(benchmark.timed(call))
        kernel, blocks = (statistics.median(times[name]) * 1e3 for name in calls)
        print(f"{what:14s} [2, 8, {n}, {d}] × {m} keys: kernel {kernel:.1f} ms, blocks {blocks:.1f} ms")


def inputs(count: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        x = torch.randn(1, 4, 64, 64, generator=generator).repeat(2, 1, 1, 1)   # CFG: one latent, twice
        t = torch.tensor([999 - 333 * i] * 2)
        context = torch.randn(2, 77, 768, generator=generator)
        yield x.to(dtype), t, context.to(dtype)


def whole_steps(path: Path, pairs: int) -> None:
    pipe = benchmark.load_ours(path, torch.bfloat16, "cpu", True)
    x, t, context = next(inputs(1, torch.bfloat16))
    with torch.inference_mode():
        benchmark.switched_pairs(lambda on: use_attention_blocks(pipe.unet, on), lambda: pipe.unet(x, t, context),
                                 pairs, ("attention kernel", "attention blocks"))


def errors(path: Path, count: int) -> None:
    full = benchmark.load_ours(path, torch.float32, "cpu", True).unet   # loaded outside inference mode, as
    with torch.inference_mode():                                         # load_pipeline's networks are
        reference = [full(x, t, c) for x, t, c in inputs(count, torch.float32)]
    del full
    half = benchmark.load_ours(path, torch.bfloat16, "cpu", True).unet
    for blocks, name in ((False, "kernel"), (True, "blocks")):
        use_attention_blocks(half, blocks)
        with torch.inference_mode():
            rel = [float((half(x, t, c).float() - ref).norm() / ref.norm())
                   for (x, t, c), ref in zip(inputs(count, torch.bfloat16), reference)]
        print(f"bf16 with attention {name}: ‖ε̂_bf16 − ε̂_fp32‖/‖ε̂_fp32‖ = "
              + ", ".join(f"{r:.4f}" for r in rel) + f" (t = {', '.join(str(999 - 333 * i) for i in range(count))})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved attention calls per shape")
    parser.add_argument("--pairs", type=int, default=6, help="interleaved pairs of whole UNet steps")
    parser.add_argument("--error-steps", type=int, default=3, help="UNet inputs for the accuracy comparison")
    args = parser.parse_args()
    attention_alone(args.repeats)
    path = benchmark.synthetic_file(benchmark.DEFAULT_FILE)
    if args.pairs:
        whole_steps(path, args.pairs)
    if args.error_steps:
        errors(path, args.error_steps)


if __name__ == "__main__":
    main()
