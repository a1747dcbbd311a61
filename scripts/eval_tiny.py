"""Grade the tiny model with the pixel checker: does "a purple ring on a white background" give a purple ring on white?

    python3 scripts/eval_tiny.py                                   # the bundled ldm_scratch/bundled/tiny-shapes.safetensors
    python3 scripts/eval_tiny.py runs/tiny/model.safetensors --seeds 4 --seen 30 --guidance 1 3 5 7.5
    python3 scripts/eval_tiny.py --reconstruction 400               # the autoencoder alone: checker on D(E(x))

For every held-out combination (never in training: does the model compose words it saw apart?) and a fixed random
sample of seen (training) combinations, it generates `--seeds` images per combination with the pipeline's defaults
(sampler, steps; `pipe.txt2img`) at each guidance scale, reads (shape, colour, background) back with
`ldm_scratch.data.check`, and prints the fraction right: all three attributes, and each one alone.
The target for the shipped model is ≥ 90 % "all three" on held-out combinations at the default guidance.

`--reconstruction N` first grades the autoencoder alone: N freshly drawn images (all 150 combinations in turn),
encoded to the posterior mean and decoded, x̂ = D(E(x)), read by the checker. No generated image can be graded
better than the decoder draws it, so this is the ceiling the diffusion model works under.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import numpy as np
import torch

import ldm_scratch
from ldm_scratch.data import all_combinations, caption, check, heldout_combinations, render, train_combinations
from ldm_scratch.data.shapes import to_tensor

ATTRIBUTES = ("shape", "colour", "background")


def evaluate(pipe, combos, seeds: int, guidance_scale: float, steps: int | None, sampler: str | None) -> dict:
    """{"all": fraction, "shape": …, "colour": …, "background": …, "n": images} over combos × seeds."""
    options = {"guidance_scale": guidance_scale, "output_type": "np", "progress": False}
    if steps is not None:
        options["steps"] = steps
    if sampler is not None:
        options["sampler"] = sampler
    prompts = [caption(*c) for c in combos]
    right = {a: 0 for a in ATTRIBUTES + ("all",)}
    for s in range(seeds):
        images = pipe.txt2img(prompts, seed=1000 * s, **options)  # image i uses seed 1000·s + i
        for combo, image in zip(combos, images):
            reading = check(image)
            for attribute, got, want in zip(ATTRIBUTES, reading.as_tuple(), combo):
                right[attribute] += got == want
            right["all"] += reading.matches(*combo)
    n = len(combos) * seeds
    return {**{k: v / n for k, v in right.items()}, "n": n}


@torch.inference_mode()
def reconstruction(vae, n: int, seed: int = 12345) -> dict:
    """{"all": …, "shape": …, "colour": …, "background": …, "n": n} for the checker on x̂ = D(E(x)) (posterior
    mean) of n drawn images cycling through all 150 combinations; each image's jitter is seeded by (seed, i)."""
    combos = [all_combinations()[i % 150] for i in range(n)]
    right = {a: 0 for a in ATTRIBUTES + ("all",)}
    for start in range(0, n, 50):
        batch = combos[start:start + 50]
        x = torch.stack([to_tensor(render(*c, rng=np.random.default_rng([seed, start + i])))
                         for i, c in enumerate(batch)])                                   # [B, 3, 64, 64]
        x_rec = vae.decode(vae.encode(x).mean)                                            # x̂ = D(E(x))
        pixels = ((x_rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for combo, image in zip(batch, pixels):
            reading = check(image)
            for attribute, got, want in zip(ATTRIBUTES, reading.as_tuple(), combo):
                right[attribute] += got == want
            right["all"] += reading.matches(*combo)
    return {**{k: v / n for k, v in right.items()}, "n": n}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="default: the bundled tiny model")
    parser.add_argument("--seeds", type=int, default=4, help="images per combination (default 4)")
    parser.add_argument("--seen", type=int, default=30, help="seen combinations sampled (default 30 of 140)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0, 7.5])
    parser.add_argument("--steps", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--sampler", default=None, help="default: the pipeline's")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--reconstruction", type=int, default=0, metavar="N",
                        help="first grade the autoencoder alone on N images (default 0: skip)")
    args = parser.parse_args(argv)

    pipe = ldm_scratch.load_pipeline(args.checkpoint)
    if args.reconstruction:
        r = reconstruction(pipe.vae, args.reconstruction)
        print(f"autoencoder D(E(x)): all three {r['all']:.1%}, shape {r['shape']:.1%}, colour {r['colour']:.1%}, "
              f"background {r['background']:.1%} (n = {r['n']})", flush=True)
    seen = random.Random(0).sample(train_combinations(), args.seen)
    groups = {"held-out": heldout_combinations(), "seen": seen}
    print(f"model: {pipe.config.name}; {len(groups['held-out'])} held-out and {len(seen)} seen combinations × "
          f"{args.seeds} seeds; sampler {args.sampler or 'default'}, steps {args.steps or 'default'}")
    print(f"{'guidance':>8}  {'combinations':<12} {'all three':>9} {'shape':>7} {'colour':>7} {'backgr.':>7} {'n':>5}")
    results = []
    start = time.time()
    for guidance_scale in args.guidance:
        for name, combos in groups.items():
            r = evaluate(pipe, combos, args.seeds, guidance_scale, args.steps, args.sampler)
            results.append({"guidance_scale": guidance_scale, "combinations": name, **r})
            print(f"{guidance_scale:>8g}  {name:<12} {r['all']:>9.1%} {r['shape']:>7.1%} {r['colour']:>7.1%} "
                  f"{r['background']:>7.1%} {r['n']:>5}", flush=True)
    print(f"({time.time() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
