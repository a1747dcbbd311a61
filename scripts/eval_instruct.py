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
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ldm_scratch.data import caption, check
from ldm_scratch.pipeline import load_pipeline
from ldm_scratch.training.instruct_data import KINDS, edit_pairs

HIDDEN_SEED = 12345   # training draws its pairs with seed 0 (InstructTrainConfig.seed)
ATTRIBUTES = {"shape": 0, "colour": 1, "background": 2}


def grade(reading: tuple, edit) -> dict:
    """edit right / kept / all three, for one output read by the checker."""
    changed = ATTRIBUTES[edit.kind]
    kept = all(reading[i] == edit.source[i] for i in range(3) if i != changed)
    return {"edit_right": reading[changed] == edit.value, "kept": kept, "all_three": tuple(reading) == edit.target}


def run_method(name: str, pipe, base, sources, edits, args, scales=None) -> list[dict]:
    """One method over all cases, in batches; returns one graded row per case. scales: (s_I, s_T) for instruct
    (default: --image-guidance, --guidance)."""
    image_guidance, guidance = scales or (args.image_guidance, args.guidance)
    rows = []
    for first in range(0, len(edits), args.batch):
        part = range(first, min(first + args.batch, len(edits)))
        images = [sources[i].permute(1, 2, 0).numpy() for i in part]
        common = dict(steps=args.steps, seed=args.seed + first, output_type="np", progress=False)
        if name == "instruct":
            out = pipe.instruct(images, [edits[i].instruction for i in part], image_guidance_scale=image_guidance,
                                guidance_scale=guidance, sampler=args.sampler, **common)
        else:
            prompts = [edits[i].instruction if name == "img2img_instruction" else caption(*edits[i].target)
                       for i in part]
            out = base.img2img(prompts, images, strength=args.strength, **common)
        for k, i in enumerate(part):
            reading = check(out[k]).as_tuple()
            rows.append({"kind": edits[i].kind, "triple": list(edits[i].triple), "source": list(edits[i].source),
                         "read": list(reading), **grade(reading, edits[i])})
    return rows


def summarise(rows: list[dict]) -> dict:
    def rates(subset):
        return {m: round(float(np.mean([r[m] for r in subset])), 4) for m in ("edit_right", "kept", "all_three")} \
            | {"n": len(subset)}
    return {"all": rates(rows), **{kind: rates([r for r in rows if r["kind"] == kind]) for kind in KINDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the 8-channel instruct model (.safetensors)")
    parser.add_argument("--base", default=None, help="the text-to-image model for the baselines (default: bundled)")
    parser.add_argument("--n", type=int, default=150, help="cases per split (held-out, trained)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sampler", default="euler_a")
    parser.add_argument("--image-guidance", type=float, default=1.5)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--strength", type=float, default=0.75, help="the img2img baselines' strength")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--splits", default="heldout,train", help="which cases: heldout, train or both")
    parser.add_argument("--cases-seed", type=int, default=HIDDEN_SEED,
                        help=f"layout seed of the cases (default HIDDEN_SEED = {HIDDEN_SEED}, the graded set; "
                             "another seed with --splits train gives validation cases)")
    parser.add_argument("--sweep", default=None,
                        help="s_I:s_T pairs, comma-separated: grade instruct at each (no baselines)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    start = time.time()
    pipe, base = load_pipeline(args.model), load_pipeline(args.base)
    methods = ["instruct"] + ([] if args.no_baselines else ["img2img_instruction", "img2img_target_caption"])
    sweep = [tuple(float(v) for v in pair.split(":")) for pair in args.sweep.split(",")] if args.sweep else None
    if sweep:
        methods = [f"instruct@{s_i:g}:{s_t:g}" for s_i, s_t in sweep]
    result = {"measure": __doc__.split("\n\n")[1], "settings": vars(args), "results": {}, "rows": {}}
    for split in args.splits.split(","):
        sources, _, edits = edit_pairs(split, args.n, pipe.config.image_size, args.cases_seed)
        # the checker on the rendered sources: every case starts from an image it reads right
        result[f"{split}_sources_read_right"] = float(np.mean(
            [check(s.permute(1, 2, 0).numpy()).matches(*e.source) for s, e in zip(sources, edits)]))
        for k, name in enumerate(methods):
            rows = run_method(name.split("@")[0], pipe, base, sources, edits, args, sweep[k] if sweep else None)
            result["results"][f"{split}/{name}"] = summarise(rows)
            result["rows"][f"{split}/{name}"] = rows
            print(f"{split:8s} {name:24s}", json.dumps(result["results"][f"{split}/{name}"]["all"]), flush=True)
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result["results"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
