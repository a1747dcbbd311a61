"""Teach the bundled tiny model a shape it has never seen ("cross") from 20 pictures, three ways, and grade it.

    python scripts/finetune_demo.py                 # the measurement (≈ 10 min of training on 2 cores in all)
    python scripts/finetune_demo.py --smoke         # 1 step each, 2 prompts: checks the script runs

The measure, fixed before the first run:

- Data: 20 rendered crosses (shapes.NEW_SHAPES), one per (colour, background) pair of 20 of the 30 cross pairs,
  each with its caption "a {colour} cross on a {background} background" in a .txt beside it. The other 10 pairs are
  held out: the model never sees them with "cross".
- New word: for the 10 held-out cross prompts × 2 seeds (20 images), the fraction the pixel checker
  (checker.check(..., new_shapes=True)) reads as exactly (cross, colour, background). Target ≥ 80 %.
- Old vocabulary: for the 150 (shape, colour, background) prompts of the original data × 1 seed, the fraction
  read exactly right (checker with new_shapes=True, so a square drawn as a cross counts as wrong), before and after;
  the drop in percentage points. Target ≤ 5 points for LoRA and for DreamBooth with prior preservation; reported
  for DreamBooth without prior preservation too.
- Sampling: DPM-Solver++ 2M, 20 steps, guidance 7.5, 64×64, seeds 0 and 1 (old vocabulary: seed 0).
- Runs (all on the bundled model, seed 0, batch 8):
    lora           --lora-targets all --lora-text-encoder, rank 8, lr 3e-3, 400 steps
    dreambooth+pp  UNet + text encoder, lr 3e-4, 400 steps, prior preservation λ = 1 with 60 class images of the
                   old vocabulary (prompts cycling through the 150 old captions)
    dreambooth     the same without prior preservation
  Training time is measured per run (--threads 1: on a shared 2-core machine two threads were 15× slower);
  the ≤ 10 minute budget is the time of one method's training (class images included).
  Note (round 3): "60 class images cycling through the 150 old captions" are circles and squares only (the
  captions are ordered shape by shape); later recipes use 150, one per old caption.
- Later recipes (RECIPES below, each with the run that led to it; --methods picks them) are experiments on this
  fixed measure. Rounds 1–3: 8 recipes, docs/finetune_demo_run{1,2,3}.json (round 3 with the per-shape breakdown
  of the old vocabulary: what the checker read instead of each old shape). Round 4: every recipe after
  dreambooth+pp150-unet, docs/finetune_demo_run4.json, one entry per invocation. Recipes were chosen by looking
  at the graded numbers of the earlier ones (there is no separate validation set), so a recipe that meets the
  targets is re-run with another training seed (--seed 1: the batches and the class images' noise change) and
  both are reported. Round 5 (docs/finetune_demo_run5.json): the recipe must meet both targets on training seeds
  0, 1 and 2, chosen by its seed-0 result first; recipes with --token name the new shape with that new word in
  their captions and held-out prompts ("a red <cross> on a blue background"), everything else unchanged.

Writes runs/finetune_demo/<method>/ (data, checkpoints, outputs) and prints one table; --out to put it elsewhere.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_scratch.data.checker import check  # noqa: E402
from ldm_scratch.data.shapes import all_combinations, caption, new_shape_combinations, render  # noqa: E402
from ldm_scratch.pipeline import load_pipeline  # noqa: E402
from ldm_scratch.training.finetune import FinetuneConfig, finetune  # noqa: E402

N_TRAIN = 20


def prompt(combo: tuple, word: str = "cross") -> str:
    """The caption of a combination, with `word` for the new shape (a recipe's new token, e.g. "<cross>")."""
    text = caption(*combo)
    return text.replace(" cross ", f" {word} ") if combo[0] == "cross" else text


def write_data(folder: Path, word: str = "cross") -> tuple[list, list]:
    """20 cross pictures with captions (the new shape called `word`); (train pairs, held-out pairs)."""
    combos = new_shape_combinations()
    order = np.random.default_rng(16).permutation(len(combos))
    train, heldout = [combos[i] for i in order[:N_TRAIN]], [combos[i] for i in order[N_TRAIN:]]
    folder.mkdir(parents=True, exist_ok=True)
    for i, combo in enumerate(train):
        render(*combo, size=64, rng=np.random.default_rng([16, i])).save(folder / f"cross-{i:02d}.png")
        (folder / f"cross-{i:02d}.txt").write_text(prompt(combo, word) + "\n")
    return train, heldout


def readings(pipe, combos: list, seeds: list[int], batch: int = 30, word: str = "cross"
             ) -> list[tuple[tuple, tuple]]:
    """(expected combo, what the checker read) for every (combo, seed) image, seed-major (the new shape called
    `word` in the prompts)."""
    out = []
    for seed in seeds:
        for start in range(0, len(combos), batch):
            part = combos[start:start + batch]
            images = pipe.txt2img([prompt(c, word) for c in part], steps=20, guidance_scale=7.5, seed=seed,
                                  output_type="np", progress=False)
            out += [(c, check(image, new_shapes=True).as_tuple()) for image, c in zip(images, part)]
    return out


def accuracy(read: list[tuple[tuple, tuple]]) -> float:
    """Fraction of images the checker reads exactly right."""
    return sum(expected == got for expected, got in read) / len(read)


def by_shape(read: list[tuple[tuple, tuple]]) -> dict[str, dict]:
    """Per expected shape: how many right, and how many the checker read as each wrong shape (None: no shape)."""
    table: dict[str, dict] = {}
    for expected, got in read:
        row = table.setdefault(expected[0], {"right": 0, "total": 0, "read_as": {}})
        row["total"] += 1
        row["right"] += expected == got
        if got[0] != expected[0]:
            row["read_as"][str(got[0])] = row["read_as"].get(str(got[0]), 0) + 1
        elif expected != got:
            row["read_as"]["right shape, wrong colour"] = row["read_as"].get("right shape, wrong colour", 0) + 1
    return table


def show(table: dict[str, dict]) -> str:
    return "; ".join(f"{shape} {row['right']}/{row['total']}"
                     + (" (" + ", ".join(f"{n} {k}" for k, n in sorted(row["read_as"].items())) + ")"
                        if row["read_as"] else "") for shape, row in table.items())


OLD_PROMPTS = " | ".join(caption(*c) for c in all_combinations())   # the class prompts: the old vocabulary
# the old vocabulary with the squares and stars twice (150 + 60 prompts): the shapes that turned into crosses
SQUARES_STARS_TWICE = OLD_PROMPTS + " | " + " | ".join(caption(*c) for c in all_combinations()
                                                       if c[0] in ("square", "star"))

# Every recipe tried, in order, with the run that led to it (the measure above never changed).
# the distilled prior of rounds 4 and 5: 150 class images, one per old caption, the frozen base model's own
# prediction as the class half's target, 10 % of them with the empty prompt
DISTILLED_PRIOR = dict(num_class_images=150, class_prompt=OLD_PROMPTS, prior_target="model", prior_uncond=0.1)

RECIPES = {
    # round 1 (docs/finetune_demo_run1.json): the recipes of the docstring
    "lora": dict(method="lora", lora_targets="all", lora_text_encoder=True, lora_rank=8, lr=3e-3),
    "dreambooth+pp": dict(method="dreambooth", train_text_encoder=True, lr=3e-4, num_class_images=60,
                          class_prompt=OLD_PROMPTS),
    "dreambooth": dict(method="dreambooth", train_text_encoder=True, lr=3e-4),
    # round 2 (run2.json, after run 1 forgot the old vocabulary): the text encoder frozen, so the old words keep
    # their embeddings; smaller updates to the UNet
    "lora-unet": dict(method="lora", lora_targets="attention", lora_text_encoder=False, lora_rank=4, lr=1e-3),
    "dreambooth+pp-unet": dict(method="dreambooth", train_text_encoder=False, lr=1e-4, num_class_images=60,
                               class_prompt=OLD_PROMPTS),
    # round 3 (run3.json). Found first: rounds 1–2's 60 class images cycled through the first 60 of the 150
    # old prompts, which are ordered shape-major — circles and squares only; triangles, stars and rings had no
    # prior at all. From here on one class image per old prompt (150), and prior preservation for LoRA too.
    "dreambooth+pp150": dict(method="dreambooth", train_text_encoder=True, lr=3e-4, num_class_images=150,
                             class_prompt=OLD_PROMPTS),
    "lora+pp": dict(method="lora", lora_targets="all", lora_text_encoder=True, lora_rank=8, lr=3e-3,
                    num_class_images=150, class_prompt=OLD_PROMPTS),
    # after dreambooth+pp150 and lora+pp still lost 32 and 26 points (squares and stars drawn as crosses): round
    # 2's UNet-only recipe with the whole prior
    "dreambooth+pp150-unet": dict(method="dreambooth", train_text_encoder=False, lr=1e-4, num_class_images=150,
                                  class_prompt=OLD_PROMPTS),
    # round 4 (run4.json). Rounds 1–3: training the text encoder teaches "cross" (70–85 %) but moves every old
    # prompt's encoding (27–32 points lost even with the prior); freezing it keeps the old encodings but leaves
    # "cross" at its never-trained row (40–55 %). Train only the row of "cross" (--train-words): every old prompt
    # then encodes bit-identically and changes only through the UNet, which the prior guards.
    # Custom Diffusion (Kumari et al. 2023): only the prompt's K, V projections of the UNet + the word's row
    "custom-diffusion+pp150": dict(method="dreambooth", unet_params="cross-kv", train_words="cross", lr=5e-4,
                                   num_class_images=150, class_prompt=OLD_PROMPTS),
    # the whole UNet at round 2–3's lr + the word's row ("pivotal tuning" without a new token)
    "dreambooth+pp150-unet+word": dict(method="dreambooth", train_words="cross", lr=1e-4, num_class_images=150,
                                       class_prompt=OLD_PROMPTS),
    # the same with the prior leaning on what is lost: squares and stars twice (210 class images) and λ = 2
    "dreambooth+pp210sq-w2-unet+word": dict(method="dreambooth", train_words="cross", lr=1e-4,
                                            num_class_images=210, class_prompt=SQUARES_STARS_TWICE,
                                            prior_weight=2.0),
    # after the three above (run4.json, 13:48): custom-diffusion+pp150 drew no held-out cross (0 %) yet lost 23.3
    # points; the UNet + word recipes 45 % / 20.7 and 45 % / 20.0 — squares still became crosses (19 and 10 of
    # 30) although the prior holds 30 (60) squares. Two suspects: the prior's target ε′ is noise whose variance
    # swamps the small drift it should measure, and nothing trains the unconditional ε̂(x_t, ∅) that CFG at 7.5
    # subtracts 6.5 times. So: the base model's own prediction as the prior's target (--prior-target model) and
    # 10 % of the class items with the empty prompt (--prior-uncond 0.1); lr 3e-4 for the new word (45 % at 1e-4)
    "dreambooth+distill150u-unet+word-lr3e-4": dict(DISTILLED_PRIOR, method="dreambooth", train_words="cross",
        lr=3e-4),
    "dreambooth+distill150u-w3-unet+word-lr3e-4": dict(DISTILLED_PRIOR, method="dreambooth", train_words="cross",
        lr=3e-4, prior_weight=3.0),
    # the same at round 2–3's lr 1e-4, to compare with dreambooth+pp150-unet+word (the prior's target the only change)
    "dreambooth+distill150u-unet+word": dict(DISTILLED_PRIOR, method="dreambooth", train_words="cross", lr=1e-4),
    # after those three (run4.json, 14:17): the distilled prior holds the old vocabulary (4.0 and 3.3 points lost,
    # from 20.7 with ε′ at lr 1e-4) but the new word falls with it (50 %, 30 %; 70 % / 12.7 at λ = 1). The row of
    # "cross" is the one thing no old prompt reads and no prior term holds: let it move faster (word lr 2e-2,
    # from 5e-3), and give the instance term more steps against λ = 3
    "dreambooth+distill150u-w3-unet+word-lr3e-4-wordlr2e-2": dict(DISTILLED_PRIOR, method="dreambooth",
        train_words="cross", lr=3e-4, word_lr=2e-2, prior_weight=3.0),
    "dreambooth+distill150u-w3-unet+word-lr3e-4-wordlr2e-2-800": dict(DISTILLED_PRIOR, method="dreambooth",
        train_words="cross", lr=3e-4, word_lr=2e-2, prior_weight=3.0, steps=800),
    # results (run4.json, 14:38 and 14:43): 400 steps 60 % / 4.7 points; 800 steps 90 % / 0.0 points (both targets
    # met), but again with training seed 1 (--seed 1, 14:49) 65 % / 0.0 points and seed 2 (14:56) 65 % / 2.0: the
    # old vocabulary held with every seed, the new word met its target with one seed of three. The new word is
    # still learning at 800 steps (60 % → 90 % from 400 to 800 with seed 0): 1200 steps, judged on seeds 0–2
    "dreambooth+distill150u-w3-unet+word-lr3e-4-wordlr2e-2-1200": dict(DISTILLED_PRIOR, method="dreambooth",
        train_words="cross", lr=3e-4, word_lr=2e-2, prior_weight=3.0, steps=1200),
    # results (run4.json, 15:22; seeds 0 and 1 side by side, one core each): 70 % / 2.7 and 75 % / −0.7 points —
    # no better than 800 steps: the new word stays at 65–90 % across seeds. The word's row is the one part that
    # only the new pictures move: 800 steps with it at lr 5e-2, judged on seeds 0 and 1 (then 2)
    "dreambooth+distill150u-w3-unet+word-lr3e-4-wordlr5e-2-800": dict(DISTILLED_PRIOR, method="dreambooth",
        train_words="cross", lr=3e-4, word_lr=5e-2, prior_weight=3.0, steps=800),
    # results (run4.json, 15:28; seeds side by side): seed 0 90 % / 0.7 points, seed 1 60 % / −0.7 — the same split
    # round 5 (run5.json). Seed 1's misses are held-out crosses drawn as triangles, and the row of "cross" starts
    # where the base model reads a triangle (17 of 20 base images; its row's cosine with "triangle" 0.42, the
    # largest with any shape). So a NEW word, "<cross>" (--token: its rows train with the UNet, saved beside the
    # model as an embedding file), starting from "sign": of 18 common one-token words, the row least like any
    # shape, colour or template word (largest |cosine| 0.18; chosen on the embeddings alone, nothing graded).
    # One vector, and three (textual inversion's --num-vectors: more room for the word). The prompts of the
    # measure say "<cross>" where they said "cross"; pictures, held-out pairs, seeds and checker are unchanged.
    "dreambooth+distill150u-w3-unet+tok1sign-lr3e-4-wordlr2e-2-800": dict(DISTILLED_PRIOR, method="dreambooth",
        token="<cross>", init_word="sign", num_vectors=1, lr=3e-4, word_lr=2e-2, prior_weight=3.0, steps=800),
    "dreambooth+distill150u-w3-unet+tok3sign-lr3e-4-wordlr2e-2-800": dict(DISTILLED_PRIOR, method="dreambooth",
        token="<cross>", init_word="sign", num_vectors=3, lr=3e-4, word_lr=2e-2, prior_weight=3.0, steps=800),
    # results (run5.json, 16:08 and 16:19, seed 0): one vector 75 % / 0.0 points (misses: 3 triangles, a square, a
    # star); three vectors 10 % / 2.0 — but 17 of 20 held-out images ARE crosses, 15 in a wrong colour: the two
    # extra vectors push "on a <colour> background" two places right, to positions the frozen text encoder only
    # ever saw padding at, and twenty pictures do not teach the UNet to read colours there. So: two vectors
    # (one place), and LoRA (rank 8, every UNet layer: a low-rank update that may memorise the 20 colour pairs
    # less than the whole UNet) with the same distilled prior and the new word "<cross>" in the file beside it
    "dreambooth+distill150u-w3-unet+tok2sign-lr3e-4-wordlr2e-2-800": dict(DISTILLED_PRIOR, method="dreambooth",
        token="<cross>", init_word="sign", num_vectors=2, lr=3e-4, word_lr=2e-2, prior_weight=3.0, steps=800),
    "lora8all+distill150u-w3+tok1sign-lr1e-3-wordlr2e-2-800": dict(DISTILLED_PRIOR, method="lora",
        lora_targets="all", lora_text_encoder=False, lora_rank=8, token="<cross>", init_word="sign", num_vectors=1,
        lr=1e-3, word_lr=2e-2, prior_weight=3.0, steps=800),
    # results (run5.json, 16:31 and 16:36, seed 0): LoRA 55 % / 9.3 points (misses: 4 stars, 5 triangles; squares
    # and stars lost as crosses again) — fails both targets; two vectors 5 % / 1.3 points, 15 of 20 held-out
    # crosses in a wrong colour: one place of shift is enough to break the colours, so one vector it is. The old
    # vocabulary keeps 3–5 points of room (0.0–2.0 lost at λ = 3): spend some on the new word, λ = 2, with the
    # row of "cross" (round 4's recipe, 90 % with seed 0) and with the new word "<cross>" from "sign"
    "dreambooth+distill150u-w2-unet+word-lr3e-4-wordlr2e-2-800": dict(DISTILLED_PRIOR, method="dreambooth",
        train_words="cross", lr=3e-4, word_lr=2e-2, prior_weight=2.0, steps=800),
    "dreambooth+distill150u-w2-unet+tok1sign-lr3e-4-wordlr2e-2-800": dict(DISTILLED_PRIOR, method="dreambooth",
        token="<cross>", init_word="sign", num_vectors=1, lr=3e-4, word_lr=2e-2, prior_weight=2.0, steps=800),
    # results (run5.json, 16:43, seed 0, side by side): the row of "cross" at λ = 2: 95 % / 2.0 points (1 miss, a
    # triangle); "<cross>" from "sign" at λ = 2: 80 % / 0.0. The first, by its seed-0 result: seeds 1 and 2 next.
    # Results (16:53, side by side): seed 1 75 % / 4.7 points, seed 2 85 % / 2.7 — fails on seed 1 (4 triangles,
    # a star). λ = 2 lifts the new word (95/75/85 vs λ = 3's 90/65/65) and spends most of the drop's room (2.0/4.7/
    # 2.7). The other seed-0 pass, "<cross>" at λ = 2 (80 % / 0.0: both targets, the old vocabulary untouched),
    # is confirmed on seeds 1 and 2 with the same recipe (no new choice). Results (16:58): seed 1 65 % / 4.0 points
    # (6 triangles, a star), seed 2 85 % / 3.3 — fails on seed 1 as well. Last try in the time left, chosen before
    # any of its runs: λ = 2 with 1200 steps (at λ = 3, 1200 steps took seed 1 from 65 % to 75 %), seeds 0 and 1
    # side by side (a single recipe, both reported whatever they give; seed 2 only if both pass)
    "dreambooth+distill150u-w2-unet+word-lr3e-4-wordlr2e-2-1200": dict(DISTILLED_PRIOR, method="dreambooth",
        train_words="cross", lr=3e-4, word_lr=2e-2, prior_weight=2.0, steps=1200),
    # results (run5.json, 17:08, side by side, 405 s of training each): seed 0 80 % / 1.3 points, seed 1 100 % /
    # 2.0 — both pass: seed 2 next. Result (17:15): seed 2 95 % / 1.3 points. Both targets met on training seeds
    # 0, 1 and 2 (new word 80/100/95 %, old vocabulary down 1.3/2.0/1.3 points, 388–406 s of training on one core);
    # seed 0 is exactly at the 80 % line, so the margin there is one image
}


def grade(pipe, heldout: list, old: list, seeds_new: list[int], word: str = "cross") -> dict:
    new_read, old_read = readings(pipe, heldout, seeds_new, word=word), readings(pipe, old, [0])
    return {"new": accuracy(new_read), "old": accuracy(old_read), "new_by_shape": by_shape(new_read),
            "old_by_shape": by_shape(old_read)}


def grade_base(out: Path, heldout: list, old: list, seeds_new: list[int]) -> dict:
    """The base model's grade, kept in OUT/base.json and reused while the bundled model file and the prompts are
    the same (its images are the same pixels every time: deterministic sampling from fixed seeds)."""
    import hashlib
    bundled = Path(__file__).resolve().parents[1] / "ldm_scratch" / "bundled" / "tiny-shapes.safetensors"
    key = {"model_sha256": hashlib.sha256(bundled.read_bytes()).hexdigest(), "heldout": [list(c) for c in heldout],
           "old": [list(c) for c in old], "seeds_new": seeds_new}
    cache = out / "base.json"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["key"] == key:
            return stored["graded"]
    graded = grade(load_pipeline(fast=False), heldout, old, seeds_new)
    cache.write_text(json.dumps({"key": key, "graded": graded}))
    return graded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/finetune_demo")
    parser.add_argument("--smoke", action="store_true", help="1 step per method, 2 prompts: a quick check")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine more threads only contend)")
    parser.add_argument("--methods", default="lora,dreambooth+pp,dreambooth",
                        help="recipes to run, comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--steps", type=int, default=400, help="training steps of a recipe that names none")
    parser.add_argument("--grade-only", action="store_true",
                        help="train nothing: grade the outputs already in OUT/<recipe>/ (e.g. for the breakdown)")
    parser.add_argument("--record", default="", help="also append the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed (not 0: the run is named RECIPE@seedN; the measure is unchanged)")
    args = parser.parse_args()
    unknown = [name for name in args.methods.split(",") if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    train, heldout = write_data(out / "data")
    old = all_combinations()
    if args.smoke:
        heldout, old = heldout[:2], old[:2]
    seeds_new = [0] if args.smoke else [0, 1]
    results = {"base": grade_base(out, heldout, old, seeds_new)}
    print(f"base model: new word {results['base']['new']:.0%}, old vocabulary {results['base']['old']:.1%}: "
          f"{show(results['base']['old_by_shape'])}", flush=True)
    for recipe_name in args.methods.split(","):
        recipe = dict(RECIPES[recipe_name])
        name = recipe_name if args.seed == 0 else f"{recipe_name}@seed{args.seed}"
        recipe_steps = 1 if args.smoke else recipe.pop("steps", args.steps)
        recipe.pop("steps", None)         # (--smoke)
        if args.smoke and "num_class_images" in recipe:
            recipe["num_class_images"] = 2
        word = recipe.get("token") or "cross"          # a new token: the same pictures, captions with the token
        data = out / "data" if word == "cross" else out / f"data-{word.strip('<>')}"
        if word != "cross":
            write_data(data, word)
        cfg = FinetuneConfig(data=str(data), out_dir=str(out / name), steps=recipe_steps, batch=8,
                             force=True, checkpoint_every=100, seed=args.seed, **recipe)
        seconds, loss = None, None
        if not args.grade_only:
            shutil.rmtree(cfg.out_dir, ignore_errors=True)   # a fresh run: its time includes the class images
            start = time.time()
            result = finetune(cfg, resume=False)
            seconds, loss = time.time() - start, float(np.mean(result["loss"][-20:]))
        if cfg.method == "lora":              # graded as a user gets it: the file, loaded by the pipeline
            pipe = load_pipeline(fast=False)
            pipe.load_lora(cfg.output)
        else:
            pipe = load_pipeline(cfg.output, fast=False)
        if cfg.token and cfg.method != "textual-inversion":   # the new word's rows, in the file beside
            pipe.load_textual_inversion(cfg.embedding_output, token=cfg.token)
        graded = grade(pipe, heldout, old, seeds_new, word)
        results[name] = {"recipe": {**recipe, "steps": recipe_steps, "batch": 8, "seed": args.seed}, **graded,
                         "drop_points": 100 * (results["base"]["old"] - graded["old"]), "train_seconds": seconds,
                         "final_loss": loss}
        trained = f"trained in {seconds:.0f} s" if seconds is not None else "graded again"
        print(f"{name}: new word {graded['new']:.0%}, old vocabulary {graded['old']:.1%} (drop "
              f"{results[name]['drop_points']:.1f} points), {trained}\n  old by shape: "
              f"{show(graded['old_by_shape'])}\n  new word: {show(graded['new_by_shape'])}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if args.record and not args.smoke:
        record = Path(args.record)
        runs = json.loads(record.read_text()) if record.is_file() else []
        runs.append({"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
                     **results})
        record.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
