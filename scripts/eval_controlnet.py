"""Grade a ControlNet trained for the tiny model: does the generated shape sit where the control's edges say?

The measure, fixed before the training run (README, "ControlNet"):
- hidden layouts: N shapes drawn by the data generator with a seed training never used (all 150 combinations,
  held-out ones included), so position, size and rotation are new; the control is each image's Canny edge map;
- the prompt is the image's own caption; each prompt is generated twice from the same seed: with the ControlNet
  and without it (the baseline: where the base model puts the shape by itself);
- IoU between the generated shape's mask and the control image's shape mask (both read with the checker's rule:
  t = (p − b)·(f − b)/‖f − b‖² > ½, largest blob); success = IoU ≥ 0.8, goal: ≥ 80 % of cases;
- the caption must still be obeyed: the checker reads (shape, colour, background) back from the generated image.

    python scripts/eval_controlnet.py weights/tiny-shapes-canny-controlnet.safetensors --n 100 --json out.json

Choosing inference settings (steps, scale, guidance, sampler) is done on VALIDATION layouts (`--layout-seed`
other than the hidden 12345, e.g. 777); the hidden layouts grade the chosen setting once. The summary also gives the
ceiling the decoder allows: the same IoU for D(E(x)) of the rendered images themselves ("autoencoder").
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ldm_scratch.checkpoint.controlnet_file import load_controlnet
from ldm_scratch.data import caption
from ldm_scratch.data import checker
from ldm_scratch.pipeline import load_pipeline
from ldm_scratch.training.controlnet import edge_hints, generate_controlled, rendered

HIDDEN_SEED = 12345   # the training set uses seed 0 (ControlNetTrainConfig.seed); validation: any other seed


def shape_mask(image: np.ndarray) -> np.ndarray:
    """bool [64, 64]: the shape's pixels, by the checker's steps 1–3 (border median = background, core median =
    foreground, t > ½, largest 4-connected blob). image: uint8 [H, W, 3]."""
    pixels = checker._to_work_pixels(image)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    core = distance > max(checker.MIN_CORE_DISTANCE, 0.6 * np.percentile(distance, 99))
    if not core.any():
        return np.zeros(pixels.shape[:2], dtype=bool)
    axis = np.median(pixels[core], axis=0) - background
    t = np.clip((pixels - background) @ axis / (axis @ axis), 0.0, 1.0)
    return checker._largest_component(t > 0.5)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("controlnet")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--layout-seed", type=int, default=HIDDEN_SEED,
                        help="the layouts' seed: %(default)s = the hidden test set; another = validation")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    start = time.time()
    pipe = load_pipeline(None, fast=False)
    controlnet = load_controlnet(args.controlnet)
    images, combos = rendered("all", args.n, pipe.config.image_size, args.layout_seed)
    hints = edge_hints(images)
    targets = [shape_mask(image.permute(1, 2, 0).numpy()) for image in images]
    rows = []
    for first in range(0, args.n, args.batch):
        part = slice(first, first + args.batch)
        captions = [caption(*c) for c in combos[part]]
        outputs = {name: generate_controlled(pipe, net, captions, hints[part], seed=first, scale=args.scale,
                                             guidance_scale=args.guidance, steps=args.steps,
                                             sampler=args.sampler)
                   for name, net in (("control", controlnet), ("baseline", None))}
        for k, combo in enumerate(combos[part]):
            row = {"combo": combo}
            for name, batch in outputs.items():
                generated = batch[k].permute(1, 2, 0).numpy()
                row[f"{name}_iou"] = iou(shape_mask(generated), targets[first + k])
                row[f"{name}_checker"] = checker.check(generated).matches(*combo)
            rows.append(row)
    summary = {}
    for name in ("control", "baseline"):
        ious = np.array([r[f"{name}_iou"] for r in rows])
        summary[name] = {"iou_at_least_0.8": float((ious >= 0.8).mean()), "mean_iou": float(ious.mean()),
                         "median_iou": float(np.median(ious)),
                         "checker_correct": float(np.mean([r[f"{name}_checker"] for r in rows]))}
    # the checker on the rendered images themselves: what "checker_correct" can reach at best
    summary["rendered_checker_correct"] = float(np.mean(
        [checker.check(image.permute(1, 2, 0).numpy()).matches(*c) for image, c in zip(images, combos)]))
    with torch.no_grad():   # the decoder's ceiling: x̂ = D(E(x)) (posterior mean) of the rendered images
        x = images.float() / 127.5 - 1
        x_rec = pipe.vae.decode(pipe.vae.encode(x).mean)
        rec = ((x_rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    ceiling = np.array([iou(shape_mask(r.permute(1, 2, 0).numpy()), t) for r, t in zip(rec, targets)])
    summary["autoencoder"] = {"iou_at_least_0.8": float((ceiling >= 0.8).mean()), "mean_iou": float(ceiling.mean())}
    summary.update(n=args.n, steps=args.steps, scale=args.scale, guidance=args.guidance, sampler=args.sampler,
                   layout_seed=args.layout_seed, seconds=round(time.time() - start, 1))
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f)


if __name__ == "__main__":
    main()
