"""When does a tiny InstructPix2Pix lose the untouched attributes? The checker reads the sampler's own estimate
x̂₀ at several steps of each edit, not only the final image.

For every validation case (trained triples on new layouts, as eval_instruct.py's `--splits train`), after step i
the sampler reports x̂₀ (callback); D(x̂₀ / latent_scale) is read by the checker and graded as the final image is
(kept = both untouched attributes read as in the source). Reported: kept at each marked step, over all cases and
over the cases whose FINAL image fails — if those were right early and drifted, the late (low-noise) steps lose
them; if they are wrong from the first steps on, the start decides.

    python scripts/instruct_trajectory.py runs/instruct2/tiny-shapes-instruct.safetensors --kinds background \
        --json docs/instruct_trajectory.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from eval_instruct import ATTRIBUTES, grade, pooled_cases
from ldm_scratch.data import check
from ldm_scratch.pipeline import load_pipeline

MARKS = (0, 5, 10, 15, 20, 25, 30, 35, 40, 49)


@torch.inference_mode()
def readings_along_the_way(pipe, sources, edits, args) -> list[dict]:
    """One row per case: kept after each step in MARKS (x̂₀ decoded) and in the final image."""
    rows = []
    for first in range(0, len(edits), args.batch):
        part = range(first, min(first + args.batch, len(edits)))
        estimates = {}

        def keep_estimate(i, t, x0_pred):
            if i in MARKS:
                estimates[i] = x0_pred.clone()
        final = pipe.instruct([sources[i].permute(1, 2, 0).numpy() for i in part], [edits[i].instruction for i in part],
                              image_guidance_scale=args.image_guidance, guidance_scale=args.guidance,
                              sampler=args.sampler, steps=args.steps, seed=args.seed + first, output_type="np",
                              progress=False, callback=keep_estimate)
        decoded = {i: pipe._output(x0, "np") for i, x0 in estimates.items()}   # D(x̂₀) in [0, 1], [B, H, W, 3]
        for k, i in enumerate(part):
            kept = lambda image: grade(check(image).as_tuple(), edits[i])["kept"]
            rows.append({"kind": edits[i].kind, "kept_final": kept(final[k]),
                         "kept_at": {step: kept(images[k]) for step, images in decoded.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the 8-channel instruct model (.safetensors)")
    parser.add_argument("--kinds", default=",".join(ATTRIBUTES), help="edit kinds to follow (colour,shape,background)")
    parser.add_argument("--n", type=int, default=150, help="cases per layout seed, before keeping --kinds")
    parser.add_argument("--cases-seed", default="777,778", help="validation layout seeds (never the hidden one)")
    parser.add_argument("--image-guidance", type=float, default=6.0)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.steps <= max(MARKS):
        parser.error(f"--steps must be above {max(MARKS)} (the last marked step)")
    pipe = load_pipeline(args.model)
    sources, _, edits = pooled_cases("train", args.n, pipe.config.image_size,
                                     [int(seed) for seed in args.cases_seed.split(",")])
    keep = [i for i, e in enumerate(edits) if e.kind in args.kinds.split(",")]
    rows = readings_along_the_way(pipe, sources[keep], [edits[i] for i in keep], args)
    failures = [r for r in rows if not r["kept_final"]]
    rate = lambda subset, key: round(float(np.mean([key(r) for r in subset])), 4)
    result = {"settings": vars(args), "n": len(rows), "kept_final": rate(rows, lambda r: r["kept_final"]),
              "kept_at_step": {step: rate(rows, lambda r: r["kept_at"][step]) for step in MARKS},
              "n_failures": len(failures),
              "failures_kept_at_step": {step: rate(failures, lambda r: r["kept_at"][step]) for step in MARKS}
              if failures else None}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
