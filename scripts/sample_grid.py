"""The README's sample grid (docs/tiny-samples.png): 4 seen and 4 held-out prompts (rows) × 2 seeds (columns), each
image marked by the pixel checker ("ok" when shape, colour and background all read right).

    python3 scripts/sample_grid.py                                  # bundled model → docs/tiny-samples.png
    python3 scripts/sample_grid.py runs/tiny/model.safetensors --out /tmp/grid.png --guidance 3

Refuses to overwrite an existing --out unless --force.
"""
from __future__ import annotations

import argparse
import inspect
import random
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import ldm_scratch
from ldm_scratch.data import caption, check, heldout_combinations, train_combinations

SIDE, TEXT_WIDTH, PAD, TITLE = 128, 330, 4, 20   # shown image side, caption column, gaps, title band (pixels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="default: the bundled tiny model")
    parser.add_argument("--out", default="docs/tiny-samples.png")
    parser.add_argument("--guidance", type=float, default=None, help="default: the pipeline's")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        sys.exit(f"{out} exists; pass --force to overwrite it or --out to write elsewhere")
    torch.set_num_threads(1)  # tiny model: one thread is as fast as two

    pipe = ldm_scratch.load_pipeline(args.checkpoint)
    options = {"progress": False} if args.guidance is None else {"progress": False, "guidance_scale": args.guidance}
    rows = [(c, "seen") for c in random.Random(1).sample(train_combinations(), 4)]
    rows += [(c, "held-out") for c in random.Random(1).sample(heldout_combinations(), 4)]
    prompts = [caption(*combo) for combo, _ in rows]
    seeds = (0, 1)
    columns = [pipe.txt2img(prompts, seed=1000 * s, **options) for s in seeds]  # image i uses seed 1000·s + i

    font = ImageFont.load_default(size=14)
    grid = Image.new("RGB", (TEXT_WIDTH + len(seeds) * (SIDE + PAD) + PAD, len(rows) * (SIDE + PAD) + PAD + TITLE),
                     "white")
    draw = ImageDraw.Draw(grid)
    guidance = options.get("guidance_scale", inspect.signature(pipe.txt2img).parameters["guidance_scale"].default)
    draw.text((PAD, 3), f"{pipe.config.name}: pipeline defaults, guidance {guidance}", fill="black", font=font)
    for i, (combo, kind) in enumerate(rows):
        y = TITLE + PAD + i * (SIDE + PAD)
        draw.text((PAD, y + SIDE // 2 - 16), prompts[i], fill="black", font=font)
        draw.text((PAD, y + SIDE // 2 + 2), f"({kind} combination)", fill="gray", font=font)
        for j, column in enumerate(columns):
            image, x = column[i], TEXT_WIDTH + PAD + j * (SIDE + PAD)
            grid.paste(image.resize((SIDE, SIDE), Image.NEAREST), (x, y))
            right = check(image).matches(*combo)
            draw.text((x + 3, y + 2), "ok" if right else "x", fill="lime" if right else "red", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, optimize=True)
    print(out, grid.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
