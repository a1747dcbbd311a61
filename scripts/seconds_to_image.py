"""Seconds to one 512² image with ldm_scratch on this machine: the README's "Fast on a CPU" table.

    python scripts/seconds_to_image.py [--json runs/bench/seconds.json] [--only fp32,deepcache,lcm,...]

Ours only (the side-by-side ratios against diffusers come from scripts/benchmark.py); full-size SD v1.5 random
weights in the official layout (the same file as benchmark.py), so the times are those of the real model (weights do
not change the time of a dense network; they do change the picture, which is why the picture is not looked at).
Each row: one untimed 1-step call (allocations warmed), then ONE timed txt2img call of the whole pipeline
(tokenize, encode, sample, decode) at 512², prompt + negative prompt, seed 0:

    fp32          30 steps DPM-Solver++ 2M, guidance 7.5: the defaults of `pipe.txt2img`
    deepcache     the same + deepcache_interval=3 (the full UNet every third step, the shallow branch between)
    tome          the same + tome_ratio=0.5 (token merging; not in the default list: `--only tome`)
    lcm           float32, `sampler="lcm"`, 4 steps, guidance_scale 1.0 (LCM-LoRA's setting: no CFG)
    lcm_taesd     the same, decoded by TAESD instead of the KL-VAE
    bf16          the fp32 row with the networks in bfloat16 (and so, by load_pipeline's default, the UNet's
                  weights packed for oneDNN)
    bf16_lcm_taesd  bfloat16 + LCM 4 steps + TAESD: the fastest combination
    bf16_unpacked the bf16 row without the packed weights (`load_pipeline(..., prepack=False)`)

It also compares the fp32 and bf16 pictures of the first row (same seed, same weights): the bf16 image error at
full size, in 8-bit levels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import DEFAULT_FILE, NEGATIVE, PROMPT, load_ours, load_taesd_pair, synthetic_file  # noqa: E402

ROWS = ("fp32", "deepcache", "lcm", "lcm_taesd", "bf16", "bf16_lcm_taesd")
OPTIONS = {"fp32": {}, "bf16": {}, "deepcache": dict(deepcache_interval=3), "tome": dict(tome_ratio=0.5),
           "lcm": dict(sampler="lcm", steps=4, guidance_scale=1.0)}
OPTIONS["lcm_taesd"] = OPTIONS["bf16_lcm_taesd"] = OPTIONS["lcm"]
OPTIONS["bf16_unpacked"] = {}


def how_loaded(row: str) -> tuple[torch.dtype, bool | None]:
    """The pipeline a row runs on: (dtype, prepack as load_pipeline takes it: None = its default)."""
    return (torch.bfloat16 if row.startswith("bf16") else torch.float32), (False if row.endswith("unpacked") else None)


def with_taesd(pipe, dtype):
    """The same pipeline with TAESD (random weights, diffusers' default init) as its VAE."""
    from ldm_scratch.pipeline import StableDiffusion
    taesd = load_taesd_pair(dtype, "cpu", True, False)[0]
    return StableDiffusion(pipe.text_encoder, pipe.unet, taesd, pipe.config, tokenizer=pipe.tokenizer)


def timed(pipe, options: dict) -> tuple[float, np.ndarray]:
    run = dict(steps=30, seed=0, output_type="np", progress=False) | options
    with torch.inference_mode():
        pipe.txt2img(PROMPT, NEGATIVE, **(run | dict(steps=1)))          # warm-up, not timed
        start = time.perf_counter()
        image = pipe.txt2img(PROMPT, NEGATIVE, **run)[0]
        return time.perf_counter() - start, image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_FILE)
    p.add_argument("--only", default=",".join(ROWS))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = [r for r in args.only.split(",") if r]
    if set(rows) - set(OPTIONS):
        p.error(f"--only: choose from {', '.join(OPTIONS)}")
    path = synthetic_file(args.checkpoint)
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "load_average_start": os.getloadavg(),
              "seconds": {}}
    images = {}
    for dtype, prepack in dict.fromkeys(how_loaded(r) for r in rows):       # one pipeline per kind, in row order
        names = [r for r in rows if how_loaded(r) == (dtype, prepack)]
        pipe = load_ours(path, dtype, "cpu", True, prepack)
        for row in names:
            runner = with_taesd(pipe, dtype) if row.endswith("taesd") else pipe
            seconds, images[row] = timed(runner, OPTIONS[row])
            report["seconds"][row] = seconds
            print(f"{row:16} {seconds:8.1f} s", flush=True)
        del pipe
    if {"fp32", "bf16"} <= images.keys():
        diff = np.abs(images["fp32"] - images["bf16"]) * 255
        report["bf16_vs_fp32_8bit"] = {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99)),
                                       "max": float(diff.max())}
        print("bf16 vs fp32 picture, 8-bit levels:", report["bf16_vs_fp32_8bit"])
    report["load_average_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
