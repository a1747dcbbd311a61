"""What bfloat16 costs in picture on the bundled tiny model: the same prompts and seeds in float32 and in bfloat16.

    python scripts/bf16_error.py [--seeds 2] [--json docs/bf16_tiny.json]

The measure (fixed before running): all 150 (shape, colour, background) captions × `--seeds` seeds with the
pipeline's defaults (DPM-Solver++ 2M, 30 steps, guidance 7.5), once with the networks in float32 and once in
bfloat16 (`load_pipeline(dtype=torch.bfloat16)`; the sampler's state and the guidance arithmetic stay float32 in
both). Reported: the per-pixel difference of the two pictures in 8-bit levels (mean, 99th percentile, max), the
fraction of pictures whose checker reading differs, and the checker accuracy of each (held-out and seen together).
The full-size picture difference comes from scripts/seconds_to_image.py (random weights, 512²).

`--all-attention-blocks`: the bfloat16 pipeline's attention layers all run as blocked products
(fast/attention_blocks.py, scores rounded to bfloat16), not only those with ≥ 256 keys. The tiny model's layers have
64 or fewer tokens, so without it they keep the fused kernel: this is how the blocks' rounding is measured on a
trained model (docs/bf16_tiny_attention_blocks.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ldm_scratch  # noqa: E402
from ldm_scratch.data import all_combinations, caption, check  # noqa: E402
from ldm_scratch.fast.attention_blocks import BlockedAttention  # noqa: E402


def pictures(dtype: torch.dtype, prompts: list[str], seeds: int, all_blocks: bool = False) -> np.ndarray:
    """[seeds · len(prompts), 64, 64, 3] float32 in [0, 1]; picture i of seed s uses seed 1000·s + i."""
    pipe = ldm_scratch.load_pipeline(dtype=dtype)
    if all_blocks:
        for module in pipe.unet.modules():
            if isinstance(module, BlockedAttention):
                module.min_keys = 1
    with torch.inference_mode():
        return np.concatenate([pipe.txt2img(prompts, seed=1000 * s, output_type="np", progress=False)
                               for s in range(seeds)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--all-attention-blocks", action="store_true",
                   help="every bfloat16 attention layer on the blocked products (module docstring)")
    args = p.parse_args()
    combos = all_combinations()
    prompts = [caption(*c) for c in combos]
    full = pictures(torch.float32, prompts, args.seeds)
    half = pictures(torch.bfloat16, prompts, args.seeds, args.all_attention_blocks)
    diff = np.abs(full - half) * 255
    readings = [[check(image) for image in images] for images in (full, half)]
    wanted = combos * args.seeds
    report = {"n": len(wanted), "diff_8bit": {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99)),
                                              "max": float(diff.max())},
              "reading_differs": float(np.mean([a.as_tuple() != b.as_tuple() for a, b in zip(*readings)])),
              "accuracy_fp32": float(np.mean([r.matches(*c) for r, c in zip(readings[0], wanted)])),
              "accuracy_bf16": float(np.mean([r.matches(*c) for r, c in zip(readings[1], wanted)]))}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
