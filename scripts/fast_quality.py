"""What DeepCache and token merging cost in quality on the bundled tiny model: checker accuracy with and without.

    python3 scripts/fast_quality.py [--seeds 2] [--seen 0] [--guidance 7.5] [--only "plain,ToMe 0.5 md 2"] [--json F]

Each setting generates the same images as scripts/eval_tiny.py (the held-out combinations and a fixed sample of
seen ones, `--seeds` images each, the pipeline's default sampler and steps) with the UNet wrapped as the pipeline
options wrap it (fast/deepcache.py, fast/tome.py: the same wrappers `txt2img(deepcache_interval=…,
tome_ratio=…)` builds), and grades them with the pixel checker. Also printed: the fraction of the plain UNet's
FLOPs one sampler step costs on average (torch.utils.flop_counter on one full and one shallow pass, at the tiny
model's 64² and batch 2 with CFG, weighted by how many of the steps are full): a machine-independent stand-in for
the speed-up, which scripts/benchmark.py times at 512². The defaults (2 seeds, held-out combinations only) keep a
run near 8 minutes on a busy 2-core machine; eval_tiny.py's fuller sample is --seeds 4 --seen 30.

The tiny model has no attention at its top level (attention_levels 1, 2), so ToMe with the package's default
max_downsample = 1 merges nothing there (its images are the plain ones); the rows with max_downsample 2 and 4
(the 4×4 and 2×2 levels) show what merging costs.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from functools import partial
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import ldm_scratch
from ldm_scratch.data import heldout_combinations, train_combinations
from ldm_scratch.fast.deepcache import DeepCachedUNet
from ldm_scratch.fast.tome import TokenMergedUNet
from eval_tiny import evaluate

# name → (deepcache interval or None, ToMe ratio or None, ToMe max_downsample)
SETTINGS = {
    "plain": (None, None, 1),
    "DeepCache N=2": (2, None, 1),
    "DeepCache N=3": (3, None, 1),
    "DeepCache N=5": (5, None, 1),
    "ToMe 0.5 md 2": (None, 0.5, 2),
    "ToMe 0.5 md 4": (None, 0.5, 4),
    "DeepCache N=3 + ToMe 0.5 md 2": (3, 0.5, 2),
}


def wrapped(unet, interval, ratio, max_downsample):
    model = DeepCachedUNet(unet, interval or 1)              # interval 1: every step full (the plain UNet)
    return model, (TokenMergedUNet(model, ratio, max_downsample=max_downsample) if ratio else model)


def with_model(pipe, setting):
    """A stand-in for `pipe` whose txt2img runs the wrapped UNet (a fresh wrapper per call: its step counter)."""
    def txt2img(prompts, **options):
        counter, model = wrapped(pipe.unet, *setting)
        original = pipe._eps_model
        pipe._eps_model = lambda context, scale, extra=None, unet=None, rescale=0.0: original(
            context, scale, extra, model, rescale)
        try:
            return pipe.txt2img(prompts, **options, callback=counter.counting())
        finally:
            del pipe._eps_model
    return SimpleNamespace(txt2img=txt2img)


def counted_flops(model, x, context) -> int:
    with FlopCounterMode(display=False) as flops:
        model(x, 500, context)
    return flops.get_total_flops()


@torch.inference_mode()
def flop_fraction(pipe, setting, steps: int) -> float:
    """Average FLOPs per step over `steps` steps, as a fraction of the plain UNet's (64², CFG batch 2)."""
    size = pipe.config.image_size // pipe.config.vae.downsample_factor
    x = torch.randn(2, pipe.config.latent_channels, size, size)
    context = torch.randn(2, 77, pipe.config.unet.context_dim)
    counter, model = wrapped(pipe.unet, *setting)
    full = counted_flops(model, x, context)                          # step 0: a full pass
    counter.step = 1
    shallow = counted_flops(model, x, context) if counter.interval > 1 else full
    n_full = len(range(0, steps, counter.interval))
    return (n_full * full + (steps - n_full) * shallow) / (steps * counted_flops(pipe.unet, x, context))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--seen", type=int, default=0, help="seen combinations sampled (default 0: held-out only)")
    parser.add_argument("--only", default=None, help="comma-separated settings (default all): " + ", ".join(SETTINGS))
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    pipe = ldm_scratch.load_pipeline()
    steps = 30   # the pipeline's default (txt2img's steps)
    groups = {"held-out": heldout_combinations(), "seen": random.Random(0).sample(train_combinations(), args.seen)}
    groups = {g: combos for g, combos in groups.items() if combos}
    names = args.only.split(",") if args.only else list(SETTINGS)
    print(f"model {pipe.config.name}; guidance {args.guidance}; {args.seeds} seeds; default sampler/steps ({steps})")
    print(f"{'setting':32} {'UNet FLOPs':>10} " + " ".join(f"{g:>9}" for g in groups) + f" {'n':>5}")
    results, start = [], time.time()
    for name in names:
        setting = SETTINGS[name]
        run = with_model(pipe, setting)
        scores = {g: evaluate(run, combos, args.seeds, args.guidance, None, None) for g, combos in groups.items()}
        fraction = flop_fraction(pipe, setting, steps)
        results.append({"setting": name, "flop_fraction": fraction, **{g: s for g, s in scores.items()}})
        print(f"{name:32} {fraction:9.1%} " + " ".join(f"{s['all']:>9.1%}" for s in scores.values())
              + f" {sum(s['n'] for s in scores.values()):>5}", flush=True)
    print(f"({time.time() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
