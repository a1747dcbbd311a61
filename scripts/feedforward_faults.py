"""What fast/feedforward_rows.py buys: page faults and time of the UNet's feed-forward, one call vs row blocks.

    python3 scripts/feedforward_faults.py [--dtype bf16|fp32] [--pairs 10] [--ff-repeats 12]

1. The feed-forward layers alone at SD v1's shapes at 512² with CFG ([2, 4096, 320], [2, 1024, 640], [2, 256, 1280];
   5, 5 and 6 of them per step), random weights, packed as load_pipeline packs them in bfloat16: medians of
   interleaved calls, one call vs row blocks, and the sum over a step.
2. Whole UNet steps on the full-size random weights (scripts/synthetic_checkpoint.py, as scripts/benchmark.py
   loads them), interleaved in pairs: the minor page faults of each step (getrusage) and the paired time ratio.
Numbers in the docstring of ldm_scratch/fast/feedforward_rows.py and the README ("bfloat16 on a CPU").
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (its loader and synthetic weights)

from ldm_scratch.fast import prepack_weights, use_feedforward_rows  # noqa: E402
from ldm_scratch.spatial_transformer import GEGLUFeedForward  # noqa: E402

SHAPES = [(320, 4096, 5), (640, 1024, 5), (1280, 256, 6)]     # (channels, tokens, layers per step)


def interleave(ff, x, repeats: int, times: dict) -> None:
    """repeats × (one call, row blocks), each timed after an untimed call (packing for its row count)."""
    for _ in range(repeats):
        for blocks in (False, True):
            use_feedforward_rows(ff, blocks)
            ff(x)
            times[blocks].append(benchmark.timed(lambda: ff(x)))


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def feedforward_alone(dtype: torch.dtype, repeats: int) -> None:
    total = {False: 0.0, True: 0.0}
    for dim, tokens, layers in SHAPES:
        ff = GEGLUFeedForward(dim).to(dtype).eval()         # built outside inference mode, as load_pipeline builds
        if dtype == torch.bfloat16:
            prepack_weights(ff)
        x = torch.randn(2, tokens, dim).to(dtype)
        times = {False: [], True: []}
        with torch.inference_mode():
            interleave(ff, x, repeats, times)
        medians = {k: statistics.median(v) for k, v in times.items()}
        for k in total:
            total[k] += layers * medians[k]
        print(f"feed-forward [2, {tokens}, {dim}]: one call {medians[False] * 1e3:.1f} ms, "
              f"row blocks {medians[True] * 1e3:.1f} ms")
    print(f"per UNet step ({'+'.join(str(n) for *_, n in SHAPES)} layers): one call {total[False]:.3f} s, "
          f"row blocks {total[True]:.3f} s")


def whole_steps(dtype: torch.dtype, pairs: int) -> None:
    pipe = benchmark.load_ours(benchmark.synthetic_file(benchmark.DEFAULT_FILE), dtype, "cpu", True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=generator).to(dtype)
    t = torch.tensor([500, 500])
    context = torch.randn(2, 77, 768, generator=generator).to(dtype)
    with torch.inference_mode():                           # the weights loaded outside it, as load_pipeline's are
        benchmark.switched_pairs(lambda on: use_feedforward_rows(pipe.unet, on), lambda: pipe.unet(x, t, context),
                                 pairs, ("one call", "row blocks"), probe=minor_page_faults)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--pairs", type=int, default=10, help="interleaved pairs of whole UNet steps")
    parser.add_argument("--ff-repeats", type=int, default=12, help="interleaved feed-forward calls per shape")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    feedforward_alone(dtype, args.ff_repeats)
    if args.pairs:
        whole_steps(dtype, args.pairs)


if __name__ == "__main__":
    main()
