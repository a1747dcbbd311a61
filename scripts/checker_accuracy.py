"""Measure the pixel checker (ldm_scratch/data/checker.py) on drawn captioned-shapes images.

    python scripts/checker_accuracy.py              # 2000 images per condition, about 2 minutes on one core
    python scripts/checker_accuracy.py --n 300

Images cycle through all 150 (shape, colour, background) combinations, held-out ones included, each with its own
seeded jitter. Besides clean images at several sizes, the checker is run on degraded copies that imitate what a
small generative model gets wrong: soft edges (Gaussian blur), pixel noise, a colour cast, JPEG artefacts.
Prints, per condition, the fraction of images with each attribute right, all three right, and flagged confident.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_scratch.data.checker import check  # noqa: E402
from ldm_scratch.data.shapes import HELDOUT, all_combinations, render  # noqa: E402


def degrade(image: Image.Image, rng: np.random.Generator, warp: float = 0.0, blur: float = 0.0,
            noise: float = 0.0, cast: float = 0.0, jpeg: int | None = None) -> Image.Image:
    """Warp (a smooth random displacement of about `warp` pixels of a 64² image: wobbly outlines), blur
    (Gaussian, σ in pixels of a 64² image), add N(0, noise²) per pixel and a per-channel colour cast N(0, cast²)
    (both in [0, 1] units), then JPEG-compress at quality `jpeg`."""
    if warp:
        image = _warp(image, rng, warp * image.width / 64)
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur * image.width / 64))
    pixels = np.asarray(image, dtype=np.float64) / 255
    pixels = pixels + rng.normal(0, cast, size=3) + rng.normal(0, noise, size=pixels.shape)
    image = Image.fromarray(np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8))
    if jpeg is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=jpeg)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def _warp(image: Image.Image, rng: np.random.Generator, amplitude: float) -> Image.Image:
    """Move each pixel by a displacement field drawn on a 5×5 grid and upsampled bilinearly (smooth)."""
    size = image.width
    field = [np.asarray(Image.fromarray(rng.normal(0, amplitude, (5, 5)).astype(np.float32), "F")
                        .resize((size, size), Image.BILINEAR)) for _ in range(2)]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    ys, xs = np.clip(ys + field[0], 0, size - 1), np.clip(xs + field[1], 0, size - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, size - 1), np.minimum(x0 + 1, size - 1)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    pixels = np.asarray(image, dtype=np.float64)
    out = (pixels[y0, x0] * (1 - wx) + pixels[y0, x1] * wx) * (1 - wy) + \
          (pixels[y1, x0] * (1 - wx) + pixels[y1, x1] * wx) * wy
    return Image.fromarray(np.round(out).astype(np.uint8))


CONDITIONS = {  # name: (image size, degrade options)
    "clean 64²": (64, {}),
    "clean 32²": (32, {}),
    "clean 256²": (256, {}),
    "blur 1 + noise 0.05": (64, {"blur": 1.0, "noise": 0.05}),
    "blur 2 + noise 0.10": (64, {"blur": 2.0, "noise": 0.10}),
    "blur 1 + noise 0.05 + cast 0.08": (64, {"blur": 1.0, "noise": 0.05, "cast": 0.08}),
    "blur 1 + JPEG q=30": (64, {"blur": 1.0, "jpeg": 30}),
    "warp 1.5 + blur 1 + noise 0.05": (64, {"warp": 1.5, "blur": 1.0, "noise": 0.05}),
    "warp 3 + blur 1 + noise 0.05": (64, {"warp": 3.0, "blur": 1.0, "noise": 0.05}),
    "harsh: warp 2, blur 3, noise .15, cast .12": (64, {"warp": 2.0, "blur": 3.0, "noise": 0.15, "cast": 0.12}),
}


def measure(n: int, size: int, options: dict, seed: int = 0) -> dict:
    combos = all_combinations()
    heldout = set(HELDOUT)
    hits = {"shape": 0, "colour": 0, "background": 0, "all": 0, "confident": 0, "heldout_all": 0, "heldout_n": 0}
    for i in range(n):
        combo = combos[i % len(combos)]
        rng = np.random.default_rng([seed, i])
        image = degrade(render(*combo, size=size, rng=rng), rng, **options)
        reading = check(image)
        for name, got, want in zip(("shape", "colour", "background"), reading.as_tuple(), combo):
            hits[name] += got == want
        right = reading.as_tuple() == combo
        hits["all"] += right
        hits["confident"] += reading.confident
        if combo in heldout:
            hits["heldout_n"] += 1
            hits["heldout_all"] += right
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images per condition (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    header = f"{'condition':42s} {'n':>5s} {'shape':>7s} {'colour':>7s} {'backgr.':>7s} {'all 3':>7s} " \
             f"{'held-out':>8s} {'confid.':>7s} {'ms/img':>6s}"
    print(header)
    print("-" * len(header))
    for name, (size, options) in CONDITIONS.items():
        start = time.perf_counter()
        hits = measure(args.n, size, options, args.seed)
        ms = 1000 * (time.perf_counter() - start) / args.n
        pct = {k: 100 * v / args.n for k, v in hits.items()}
        heldout = 100 * hits["heldout_all"] / max(hits["heldout_n"], 1)
        print(f"{name:42s} {args.n:5d} {pct['shape']:6.2f}% {pct['colour']:6.2f}% {pct['background']:6.2f}% "
              f"{pct['all']:6.2f}% {heldout:7.2f}% {pct['confident']:6.2f}% {ms:6.1f}")
    print("(held-out: all three right on the held-out combinations' images; ms/img includes drawing)")


if __name__ == "__main__":
    main()
