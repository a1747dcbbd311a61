"""Grade a tiny InstructPix2Pix (scripts/train_instruct.py): does the edit happen, and does nothing else change?

The measure, fixed before the first training run (issue 18, item 6):
- cases: edit pairs from the data generator (ldm_scratch/training/instruct_data.py) with a seed training never
  used (HIDDEN_SEED: new positions, sizes, rotations), `--n` of them drawn from the 15 HELD-OUT edit triples
  (HELDOUT_EDITS: instructions such as "make the circle yellow" that training never drew), about a third per kind
  (colour, shape, background); `--n` more from the trained triples on the same hidden layouts, for reference;
- each source image is edited by `pipe.instruct(source, instruction)` at its defaults (image guidance 1.5, text
  guidance 7.5, Euler ancestral, 30 steps), seed = the case's index;
- the checker (ldm_scratch/data/checker.py) reads (shape, colour, background) from the output:
    edit right  = the changed attribute reads as the instruction says              goal ≥ 80 % on held-out
    kept        = both untouched attributes read as in the source image            goal ≥ 90 % on held-out
  (all three = the whole target triple, both at once), overall and per instruction kind;
- baselines on the same cases and seeds, with the BASE text-to-image model: img2img of the source with the
  instruction as the prompt (strength 0.75, CFG 7.5, 30 DPM++ 2M steps, the pipeline's defaults), and img2img
  with the target's caption ("a green circle on a blue background") as the prompt — a baseline that is told the
  whole answer, the upper bound of what editing by re-description gives.

    python scripts/eval_instruct.py weights/tiny-shapes-instruct.safetensors --json docs/instruct_eval.json

Choosing the guidance scales (on validation cases, never on the held-out ones): `--splits train --cases-seed S`
with S ≠ HIDDEN_SEED draws trained triples on other new layouts, and `--sweep 1.5:7.5,3:7.5,…` grades each
s_I:s_T pair (no baselines), e.g.

    python scripts/eval_instruct.py MODEL --splits train --cases-seed 777 --n 60 --sweep 1.5:7.5,3:7.5,3:3

A sweep entry may also name the sampler, the step count and the guidance rescale φ, s_I:s_T:sampler:steps:φ
(e.g. 6:4:ddim:50 or 6:4:dpmpp_2m:50:0.7); the rest take --sampler, --steps and --guidance-rescale.
--timestep-spacing trailing samples from t = T, as a zero-terminal-SNR model (train_instruct.py --zero-snr) is.
--cases-seed takes several seeds (777,778): their cases are pooled. `--splits validation` draws the 15
VALIDATION_EDITS triples (instruct_data.py): unseen combinations for a model trained with --hold-out-validation,
so settings can be chosen on combinations it never saw without touching the held-out ones (round 5). With
--mix-like-heldout the train split's rates are also given re-weighted to the kinds' shares among the held-out
cases (`heldout_mix`, e.g. 20 colour : 16 shape : 24 background for n 60): only which cases exist is used, no
result of them. --ceiling grades, instead of a model, the ground-truth targets and their autoencoder round trip
D(E(target).mode): what the checker can read at best (no sampling).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ldm_scratch.data import caption, check
from ldm_scratch.pipeline import load_pipeline
from ldm_scratch.samplers import get_sampler
from ldm_scratch.samplers.base import SPACINGS
from ldm_scratch.training.dataset import to_model_range
from ldm_scratch.training.instruct_data import KINDS, edit_pairs

HIDDEN_SEED = 12345   # training draws its pairs with seed 0 (InstructTrainConfig.seed)
ATTRIBUTES = {"shape": 0, "colour": 1, "background": 2}


def grade(reading: tuple, edit) -> dict:
    """edit right / kept / all three, for one output read by the checker."""
    changed = ATTRIBUTES[edit.kind]
    kept = all(reading[i] == edit.source[i] for i in range(3) if i != changed)
    return {"edit_right": reading[changed] == edit.value, "kept": kept, "all_three": tuple(reading) == edit.target}


def sweep_entry(text: str) -> tuple[float, float, str | None, int | None, float | None]:
    """"6:4" → (6.0, 4.0, None, None, None); "6:4:ddim:50:0.7" → (6.0, 4.0, "ddim", 50, 0.7) (None: --sampler,
    --steps, --guidance-rescale)."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 5:
        raise ValueError(f"sweep entry {text!r}: give s_I:s_T, optionally followed by :sampler, :steps and :φ "
                         "(guidance rescale)")
    return (float(parts[0]), float(parts[1]), parts[2] if len(parts) > 2 else None,
            int(parts[3]) if len(parts) > 3 else None, float(parts[4]) if len(parts) > 4 else None)


@torch.inference_mode()
def ceiling_images(pipe, targets: torch.Tensor, name: str) -> np.ndarray:
    """The ground truth as an "output": the target images themselves, or their autoencoder round trip
    D(E(target).mode) — [N, H, W, 3] in [0, 1]."""
    images = targets.float() / 255                                               # uint8 [N, 3, H, W] → [0, 1]
    if name == "vae_roundtrip":
        x = 2 * images - 1                                                       # [0, 1] → [−1, 1]
        z = pipe.vae.encode(x).mode()                                            # E(x).mode, unscaled
        images = (pipe.vae.decode(z) / 2 + 0.5).clamp(0, 1)                      # D(z) → [0, 1]
    return images.permute(0, 2, 3, 1).numpy()


@torch.inference_mode()
def image_reliance(pipe, sources, targets, edits, ts=(50, 200, 400, 600, 800, 900, 999), seed: int = 0) -> dict:
    """How much the model uses the image to edit, per noise level: the ε-loss with c_I = 0 over the ε-loss with
    c_I, on the same pairs, noise and text (round 1's 1.4–1.5× at t ≥ 800 meant the layout was barely read).

        L(c) = mean ‖ε − ε_θ(cat[z_t, c], t, CLIP(instruction))‖²,   z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε,
        z_0 = latent_scale · E(target).mode,  ratio_t = L(0) / L(c_I)"""
    c_image = pipe.vae.encode(to_model_range(sources)).mode()                   # c_I, no latent scale
    z0 = pipe.latent_scale * pipe.vae.encode(to_model_range(targets)).mode()    # z_0
    context = pipe.text_encoder(pipe.tokenizer([e.instruction for e in edits]))
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(z0.shape, generator=generator)
    out = {"t": list(ts), "loss_with_image": [], "loss_zero_image": [], "ratio": []}
    for t in ts:
        step = torch.full((len(edits),), t, dtype=torch.long)
        z_t = pipe.schedule.q_sample(z0, step, eps)                             # √ᾱ_t z_0 + √(1−ᾱ_t) ε
        losses = [float(((eps - pipe.unet(torch.cat([z_t, c], dim=1), step, context)) ** 2).mean())
                  for c in (c_image, torch.zeros_like(c_image))]
        out["loss_with_image"].append(round(losses[0], 5)), out["loss_zero_image"].append(round(losses[1], 5))
        out["ratio"].append(round(losses[1] / losses[0], 3))
    return out


def spaced(pipe, sampler: str, args):
    """The sampler by name, or built with --timestep-spacing when given ("trailing" starts at t = T, as a
    zero-terminal-SNR model is sampled: Lin et al. 2024)."""
    if args.timestep_spacing is None:
        return sampler
    return get_sampler(sampler, schedule=pipe.schedule, timestep_spacing=args.timestep_spacing)


def run_method(name: str, pipe, base, sources, edits, args, scales=None, targets=None) -> list[dict]:
    """One method over all cases, in batches; returns one graded row per case. scales: (s_I, s_T, sampler, steps,
    φ) for instruct (default: --image-guidance, --guidance, --sampler, --steps, --guidance-rescale). targets: for
    the ceiling methods."""
    image_guidance, guidance, sampler, steps, rescale = scales or (args.image_guidance, args.guidance, None, None,
                                                                   None)
    rows = []
    for first in range(0, len(edits), args.batch):
        part = range(first, min(first + args.batch, len(edits)))
        images = [sources[i].permute(1, 2, 0).numpy() for i in part]
        common = dict(steps=steps or args.steps, seed=args.seed + first, output_type="np", progress=False)
        if name in ("target", "vae_roundtrip"):
            out = ceiling_images(pipe, targets[first:part.stop], name)
        elif name == "instruct":
            out = pipe.instruct(images, [edits[i].instruction for i in part], image_guidance_scale=image_guidance,
                                guidance_scale=guidance, sampler=spaced(pipe, sampler or args.sampler, args),
                                guidance_rescale=args.guidance_rescale if rescale is None else rescale,
                                strength=args.start_strength, **common)
        else:
            prompts = [edits[i].instruction if name == "img2img_instruction" else caption(*edits[i].target)
                       for i in part]
            out = base.img2img(prompts, images, strength=args.strength, **common)
        for k, i in enumerate(part):
            reading = check(out[k]).as_tuple()
            rows.append({"kind": edits[i].kind, "triple": list(edits[i].triple), "source": list(edits[i].source),
                         "read": list(reading), **grade(reading, edits[i])})
    return rows


def summarise(rows: list[dict], mix: dict | None = None) -> dict:
    """Rates overall and per kind; mix {kind: share}: also the rates re-weighted to those kind shares
    (heldout_mix = Σ_kind share · rate_kind)."""
    def rates(subset):
        return {m: round(float(np.mean([r[m] for r in subset])), 4) for m in ("edit_right", "kept", "all_three")} \
            | {"n": len(subset)}
    result = {"all": rates(rows), **{kind: rates([r for r in rows if r["kind"] == kind]) for kind in KINDS}}
    if mix:
        result["heldout_mix"] = {m: round(sum(share * result[kind][m] for kind, share in mix.items()), 4)
                                 for m in ("edit_right", "kept", "all_three")}
    return result


def pooled_cases(split: str, n: int, size: int, seeds: list[int]):
    """edit_pairs(split, n, size, seed) for each seed, pooled: (sources, targets, edits)."""
    parts = [edit_pairs(split, n, size, seed) for seed in seeds]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), [e for p in parts for e in p[2]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the 8-channel instruct model (.safetensors)")
    parser.add_argument("--base", default=None, help="the text-to-image model for the baselines (default: bundled)")
    parser.add_argument("--n", type=int, default=150, help="cases per split (held-out, trained)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sampler", default="euler_a")
    parser.add_argument("--timestep-spacing", default=None, choices=SPACINGS,
                        help="the instruct sampler's spacing (default: the sampler's own); trailing for zero-SNR models")
    parser.add_argument("--image-guidance", type=float, default=1.5)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="φ of pipe.instruct's guidance rescale (0 = off, the paper's)")
    parser.add_argument("--start-strength", type=float, default=None,
                        help="pipe.instruct's strength: start from the source's latents noised to that level "
                             "(1 = every step, with the signal leak of the first timestep); default: pure noise")
    parser.add_argument("--strength", type=float, default=0.75, help="the img2img baselines' strength")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--splits", default="heldout,train",
                        help="which cases, comma-separated: heldout, train, validation")
    parser.add_argument("--cases-seed", default=str(HIDDEN_SEED),
                        help=f"layout seed of the cases (default HIDDEN_SEED = {HIDDEN_SEED}, the graded set; "
                             "another seed with --splits train gives validation cases; several: 777,778, pooled)")
    parser.add_argument("--sweep", default=None,
                        help="s_I:s_T[:sampler[:steps[:φ]]] entries, comma-separated: grade instruct at each "
                             "(no baselines)")
    parser.add_argument("--mix-like-heldout", action="store_true",
                        help="also give each split's rates re-weighted to the kind shares of the held-out cases")
    parser.add_argument("--ceiling", action="store_true",
                        help="grade the targets and their autoencoder round trip instead of any model")
    parser.add_argument("--image-reliance", action="store_true",
                        help="also the ε-loss ratio with c_I = 0 over with c_I, per t, on each split's cases")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    start = time.time()
    pipe, base = load_pipeline(args.model), load_pipeline(args.base)
    methods = ["instruct"] + ([] if args.no_baselines else ["img2img_instruction", "img2img_target_caption"])
    sweep = [sweep_entry(entry) for entry in args.sweep.split(",")] if args.sweep else None
    if sweep:
        methods = [f"instruct@{entry}" for entry in args.sweep.split(",")]
    if args.ceiling:
        methods, sweep = ["target", "vae_roundtrip"], None
    seeds = [int(seed) for seed in str(args.cases_seed).split(",")]
    mix = None
    if args.mix_like_heldout:   # the kinds of the held-out cases (which cases exist, not how any model did on them)
        kinds = [e.kind for e in edit_pairs("heldout", args.n, pipe.config.image_size, HIDDEN_SEED)[2]]
        mix = {kind: kinds.count(kind) / len(kinds) for kind in KINDS}
    result = {"measure": __doc__.split("\n\n")[1], "settings": vars(args), "results": {}, "rows": {}}
    for split in args.splits.split(","):
        sources, targets, edits = pooled_cases(split, args.n, pipe.config.image_size, seeds)
        # the checker on the rendered sources: every case starts from an image it reads right
        result[f"{split}_sources_read_right"] = float(np.mean(
            [check(s.permute(1, 2, 0).numpy()).matches(*e.source) for s, e in zip(sources, edits)]))
        if args.image_reliance:
            result[f"{split}_image_reliance"] = image_reliance(pipe, sources, targets, edits)
            print(split, "loss(c_I = 0) / loss(c_I) at t", result[f"{split}_image_reliance"]["t"], ":",
                  result[f"{split}_image_reliance"]["ratio"], flush=True)
        for k, name in enumerate(methods):
            rows = run_method(name.split("@")[0], pipe, base, sources, edits, args, sweep[k] if sweep else None,
                              targets)
            result["results"][f"{split}/{name}"] = summarise(rows, mix)
            result["rows"][f"{split}/{name}"] = rows
            summary = result["results"][f"{split}/{name}"]
            print(f"{split:8s} {name:24s}", json.dumps(summary["all"]), "kept by kind",
                  [summary[kind]["kept"] for kind in KINDS], "mix", json.dumps(summary.get("heldout_mix")), flush=True)
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result["results"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
