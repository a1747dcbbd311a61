"""Can the tiny model draw a pure black or a pure white background? ε vs v, with and without zero terminal SNR.

    python3 scripts/zero_snr_experiment.py --lock /tmp/heavy.lock          # every arm, then the table
    python3 scripts/zero_snr_experiment.py --arms v v-zero-snr --steps 50   # some arms, shorter
    python3 scripts/zero_snr_experiment.py --table-only                     # the table from the arms' results

Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed") found SD unable to draw very dark
or very bright images: its schedule ends at ᾱ_T ≈ 0.0047, so the x_T seen in training still carries the image's
mean, while sampling starts from pure noise whose mean is 0 (a mid-grey image). Their fix: rescale the schedule so
ᾱ_T = 0 (zero terminal SNR; ε-prediction is then undefined at t = T, so train with v-prediction), start sampling at
t = T ("trailing" timesteps) and rescale classifier-free guidance (φ = 0.7). The other known fix is offset noise.

The measure, fixed before any arm ran: for every generated image whose caption asks for a "pure black" (0, 0, 0)
or "pure white" (255, 255, 255) background — all 55 such (shape, colour, background) combinations, seed 0 —
the background is the image's 2-pixel border (where the pixel checker reads it; the shape never touches it), and

    error      = mean over the border's pixels and channels of |pixel − target|      (0–255; 0 is perfect)
    within 10  = the fraction of images whose error ≤ 10
    read right = the fraction the checker (data.check, extreme_backgrounds=True) reads as the asked background

reported per background, plus, as a control that an arm still draws the ordinary data, the checker's "all three
right" on 10 seen ordinary combinations (seed 0).

Every arm is the same fine-tune of stage 2 (text encoder + UNet) from the bundled model — its autoencoder and latent
scale kept — on the training data with the two extra backgrounds (`extreme_backgrounds=True`: 195 combinations, 28 %
of images on pure black or pure white), with identical steps, batch, learning rate and seed; only the target (ε or
v), the schedule (SD's or rescaled to zero terminal SNR) and the offset noise differ. Training the tiny model from
scratch takes ~27 minutes, so each arm gets a short fine-tune instead (`--steps`, default 100 steps of batch 32 at
lr 2·10⁻³ — sized for a 2-core machine shared with other jobs): the table compares short fine-tunes, and an arm that
must change its target (ε → v) starts further from its goal than one that keeps it.

Sampling: our own DDIM loop below (η = 0, 20 steps, guidance 7.5, CPU noise from the seed), with diffusion.py's
eps_and_x0 turning ε̂ or v̂ into (ε̂, x̂₀). Without zero SNR it uses SD's "leading" timesteps (951, 901, …, 1);
with zero SNR "trailing" ones (999, 949, …, 49) and guidance rescale φ = 0.7, as Lin et al. prescribe
(`--without-phi` also samples the zero-SNR arms with φ = 0). The ε arm with
zero SNR is run as it is: at t = T, ᾱ_T = 0 and x̂₀ = (x_T − ε̂)/√ᾱ_T divides by 0, so ᾱ_T is clamped to 2⁻²⁴ (the
value diffusers' σ-schedulers use) for that conversion only — x̂₀'s error is then ε̂'s error times 4096.

Results: OUT/<arm>/result.json per arm; the table in docs/zero_snr_experiment.{json,md} and a sample grid in
docs/zero_snr_samples.png (one row per arm: pure black, then pure white backgrounds).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldm_scratch.checkpoint import load_models  # noqa: E402
from ldm_scratch.data import (EXTREME_BACKGROUNDS, caption, check, extreme_background_combinations,  # noqa: E402
                              render, train_combinations)
from ldm_scratch.diffusion import (ZERO_SNR_SIGMA_ALPHA_BAR, Schedule, classifier_free_guidance,  # noqa: E402
                                   eps_and_x0, rescale_guidance)
from ldm_scratch.tokenizer import load_tokenizer  # noqa: E402
from ldm_scratch.train import TrainConfig, train  # noqa: E402
from ldm_scratch.training.sampling import save_grid  # noqa: E402

BUNDLED = ROOT / "ldm_scratch" / "bundled" / "tiny-shapes.safetensors"
DOCS = ROOT / "docs"
# arm name → (prediction, zero terminal SNR, offset noise); every other setting is shared (FINE_TUNE)
ARMS = {
    "eps": ("epsilon", False, 0.0),
    "eps-offset-noise": ("epsilon", False, 0.1),
    "v": ("v", False, 0.0),
    "v-zero-snr": ("v", True, 0.0),
    "eps-zero-snr": ("epsilon", True, 0.0),
}
FINE_TUNE = dict(n_images=2000, vae_steps=0, batch_size=32, lr=2e-3, warmup_steps=10, caption_dropout=0.1,
                 extreme_backgrounds=True, sample_every=0, checkpoint_every=0, seed=0)
STEPS, GUIDANCE, PHI, SEEDS, WITHIN, CONTROL = 20, 7.5, 0.7, (0,), 10.0, 10
TARGETS = {name: float(rgb[0]) for name, rgb in EXTREME_BACKGROUNDS.items()}  # 0 and 255 (grey levels)


# ------------------------------------------------------------------------------------------------------------------
# sampling: DDIM (η = 0) for ε- or v-models, on SD's or the zero-terminal-SNR schedule
# ------------------------------------------------------------------------------------------------------------------

def timesteps(steps: int, n_train: int, spacing: str) -> list[int]:
    """"leading" (SD v1's, offset 1): 951, 901, …, 1 for 20 steps; "trailing" (Lin et al.): 999, 949, …, 49."""
    if spacing == "leading":
        return [int(t) for t in (np.arange(steps) * (n_train // steps) + 1)[::-1]]
    return [int(t) for t in np.round(np.arange(n_train, 0, -n_train / steps)).astype(int) - 1]


@torch.no_grad()
def ddim_sample(unet, context, empty, noise, schedule: Schedule, spacing: str, phi: float) -> torch.Tensor:
    """z_0 from noise z_T [B, 4, h, w]: x_{prev} = √ᾱ_prev x̂₀ + √(1−ᾱ_prev) ε̂ (DDIM eq 12, η = 0), with
    classifier-free guidance (eq 4.4) and guidance rescale φ on the network's output. The step after the last goes
    to ᾱ = 1 (returns x̂₀)."""
    ts = timesteps(STEPS, schedule.n_train_steps, spacing)
    prediction_type = schedule.config.prediction_type
    x, both = noise, torch.cat([empty, context])
    for i, t in enumerate(ts):
        out_uncond, out_cond = unet(torch.cat([x, x]), torch.tensor(float(t)), both).chunk(2)
        out = classifier_free_guidance(out_uncond, out_cond, GUIDANCE)
        if phi:
            out = rescale_guidance(out, out_cond, phi)
        alpha_bar = float(schedule.alpha_bar[t])
        if prediction_type == "epsilon":  # ᾱ_T = 0 would divide by 0: clamped (see the module docstring)
            alpha_bar = max(alpha_bar, ZERO_SNR_SIGMA_ALPHA_BAR)
        eps, x0 = eps_and_x0(x, out, alpha_bar, prediction_type)
        alpha_bar_prev = float(schedule.alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps
    return x


@torch.no_grad()
def generate(model, schedule: Schedule, combos, seed: int, spacing: str, phi: float) -> np.ndarray:
    """uint8 [B, H, W, 3] images for `combos`, noise drawn on the CPU from `seed` (one generator for the batch)."""
    tokenizer = load_tokenizer()
    context = model.text_encoder(tokenizer([caption(*c) for c in combos]))
    empty = model.text_encoder(tokenizer([""] * len(combos)))
    side = model.config.image_size // model.config.vae.downsample_factor
    noise = torch.randn(len(combos), model.config.latent_channels, side, side,
                        generator=torch.Generator().manual_seed(seed))
    z0 = ddim_sample(model.unet, context, empty, noise, schedule, spacing, phi)
    x = model.vae.decode(z0 / model.config.latent_scale)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------------------------------
# the measure
# ------------------------------------------------------------------------------------------------------------------

def border(image: np.ndarray, width: int = 2) -> np.ndarray:
    """The image's `width`-pixel border as float pixels [N, 3]."""
    return np.concatenate([image[:width].reshape(-1, 3), image[-width:].reshape(-1, 3),
                           image[:, :width].reshape(-1, 3), image[:, -width:].reshape(-1, 3)]).astype(np.float64)


def grade(images: np.ndarray, combos) -> dict:
    """Per background: mean error, fraction within WITHIN, fraction the checker reads as that background; n."""
    result = {}
    for background, target in TARGETS.items():
        rows = [i for i, c in enumerate(combos) if c[2] == background]
        errors = [float(np.abs(border(images[i]) - target).mean()) for i in rows]
        read = [check(images[i], extreme_backgrounds=True).background == background for i in rows]
        result[background] = {"error": float(np.mean(errors)), "within": float(np.mean(np.array(errors) <= WITHIN)),
                              "read_right": float(np.mean(read)), "border_mean": float(np.mean(
                                  [border(images[i]).mean() for i in rows])), "n": len(rows)}
    return result


def autoencoder_ceiling() -> dict:
    """grade() of the autoencoder's round trip D(E(x)) on rendered pictures of the same 55 combinations: the bound
    on every arm, which all keep the bundled model's autoencoder (vae_steps=0 — stage 1 never saw these backgrounds)."""
    vae = load_models(BUNDLED).vae.eval()
    combos = extreme_background_combinations()
    pictures = np.stack([np.array(render(*c, rng=np.random.default_rng(i))) for i, c in enumerate(combos)])
    x = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1                  # [55, 3, 64, 64]
    with torch.no_grad():
        y = vae.decode(vae.encode(x).mode())
    return grade(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), combos)


def evaluate(model_path: Path, prediction: str, zero_snr: bool, phi: float | None = None) -> tuple[dict, np.ndarray]:
    """(result, the first seed's images on the extreme backgrounds) of one trained arm."""
    model = load_models(model_path)
    model.text_encoder.eval(), model.unet.eval(), model.vae.eval()
    config = dataclasses.replace(model.config.schedule().config, rescale_zero_terminal_snr=zero_snr,
                                 prediction_type="v_prediction" if prediction == "v" else "epsilon")
    schedule = Schedule(config)
    spacing, phi = ("trailing", PHI if phi is None else phi) if zero_snr else ("leading", phi or 0.0)
    combos = extreme_background_combinations()
    images = np.concatenate([generate(model, schedule, combos, seed, spacing, phi) for seed in SEEDS])
    result = grade(images, combos * len(SEEDS))
    seen = [train_combinations()[i] for i in np.random.default_rng(0).choice(140, CONTROL, replace=False)]
    control = generate(model, schedule, seen, 0, spacing, phi)
    result["control_all_three"] = float(np.mean([check(im).matches(*c) for im, c in zip(control, seen)]))
    result.update(spacing=spacing, guidance_rescale=phi, steps=STEPS, guidance_scale=GUIDANCE, seeds=list(SEEDS))
    return result, images[:len(combos)]


# ------------------------------------------------------------------------------------------------------------------
# the arms
# ------------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def holding(lock: str | None):
    """flock(lock) for the duration (other heavy jobs on this machine wait for it), or nothing."""
    if lock is None:
        yield
        return
    with open(lock, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def run_arm(name: str, out: Path, steps: int, lock: str | None, without_phi: bool = False) -> dict:
    """Fine-tune (unless OUT/name/model.safetensors exists) and evaluate one arm; writes OUT/name/result.json."""
    prediction, zero_snr, offset = ARMS[name]
    arm_dir = out / name
    with holding(lock):
        start = time.time()
        if not (arm_dir / "model.safetensors").is_file():
            cfg = TrainConfig(out_dir=str(arm_dir), init=str(BUNDLED), steps=steps, prediction=prediction,
                              zero_snr=zero_snr, offset_noise=offset, progress=False, **FINE_TUNE)
            history = train(cfg, resume=False, force=True)
            losses = history["loss"]
        else:
            losses = None
        train_seconds = time.time() - start
        result, images = evaluate(arm_dir / "model.safetensors", prediction, zero_snr)
        extra = {}
        if zero_snr and without_phi:  # the same model without guidance rescale: what φ adds
            extra["no_guidance_rescale"] = evaluate(arm_dir / "model.safetensors", prediction, zero_snr, phi=0.0)[0]
    result.update(arm=name, prediction=prediction, zero_snr=zero_snr, offset_noise=offset, fine_tune_steps=steps,
                  train_seconds=round(train_seconds, 1), eval_seconds=round(time.time() - start - train_seconds, 1),
                  final_loss=None if losses is None else float(np.mean(losses[-20:])), **extra)
    (arm_dir / "result.json").write_text(json.dumps(result, indent=1))
    np.save(arm_dir / "samples.npy", images)
    return result


def run_reference(out: Path, lock: str | None) -> dict:
    """The bundled model as it ships (ε, offset noise 0.1, never saw the two extra backgrounds): a baseline."""
    arm_dir = out / "bundled"
    arm_dir.mkdir(parents=True, exist_ok=True)
    with holding(lock):
        result, images = evaluate(BUNDLED, "epsilon", False)
    result.update(arm="bundled", prediction="epsilon", zero_snr=False, offset_noise=0.1, fine_tune_steps=0)
    (arm_dir / "result.json").write_text(json.dumps(result, indent=1))
    np.save(arm_dir / "samples.npy", images)
    return result


def table(results: list[dict]) -> str:
    """The markdown table of the arms' results."""
    lines = ["| arm | prediction | zero SNR | offset noise | sampling | black: error | black: ≤ 10 | black: read "
             "| white: error | white: ≤ 10 | white: read | control (all three) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows = [(r, f"{r['spacing']}, φ = {r['guidance_rescale']}")]
        if "no_guidance_rescale" in r:
            rows.append(({**r, **r["no_guidance_rescale"]}, f"{r['spacing']}, φ = 0"))
        for values, sampling in rows:
            b, w = values["pure black"], values["pure white"]
            lines.append(f"| {r['arm']} | {r['prediction']} | {'yes' if r['zero_snr'] else 'no'} | "
                         f"{r['offset_noise']} | {sampling} | {b['error']:.1f} | {b['within']:.2f} | "
                         f"{b['read_right']:.2f} | {w['error']:.1f} | {w['within']:.2f} | {w['read_right']:.2f} | "
                         f"{values['control_all_three']:.2f} |")
    return "\n".join(lines)


NOT_RUN = "No arm has run yet: `python3 scripts/zero_snr_experiment.py` (a few minutes per arm on a quiet 2-core machine)."


def write_docs(out: Path, tag: str = "") -> None:
    """docs/zero_snr_experiment{tag}.json and .md (the table) and docs/zero_snr_samples{tag}.png from
    OUT/*/result.json."""
    names = ["bundled"] + list(ARMS)
    results = [json.loads((out / n / "result.json").read_text()) for n in names if (out / n / "result.json").is_file()]
    DOCS.mkdir(exist_ok=True)
    record = {"measure": __doc__.split("The measure, fixed before any arm ran: ")[1].split("\n\nEvery arm")[0],
              "fine_tune": FINE_TUNE, "results": results}
    text = table(results) if results else NOT_RUN
    if results:
        record["autoencoder_ceiling"] = ceiling = autoencoder_ceiling()
        b, w = ceiling["pure black"], ceiling["pure white"]
        text += (f"\n\nThe autoencoder's own round trip D(E(x)) of rendered pictures of the same combinations "
                 f"(every arm keeps this autoencoder): black error {b['error']:.1f}, ≤ 10 {b['within']:.2f}, "
                 f"read {b['read_right']:.2f}; white error {w['error']:.1f}, ≤ 10 {w['within']:.2f}, "
                 f"read {w['read_right']:.2f}.")
    (DOCS / f"zero_snr_experiment{tag}.json").write_text(json.dumps(record, indent=1) + "\n")
    (DOCS / f"zero_snr_experiment{tag}.md").write_text(text + "\n")
    print(text)
    if not results:
        (DOCS / f"zero_snr_samples{tag}.png").unlink(missing_ok=True)
        return
    grids = [np.load(out / r["arm"] / "samples.npy") for r in results]
    picks = [i for i, c in enumerate(extreme_background_combinations()) if c[0] == "circle"]  # 6 black + 5 white
    rows = torch.from_numpy(np.stack([g[picks] for g in grids])).permute(0, 1, 4, 2, 3).flatten(0, 1)
    save_grid(rows, len(grids), DOCS / f"zero_snr_samples{tag}.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "zero_snr"), help="one folder per arm")
    parser.add_argument("--arms", nargs="*", default=["bundled", *ARMS], choices=["bundled", *ARMS])
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps per arm (the same for all)")
    parser.add_argument("--without-phi", action="store_true", help="zero-SNR arms: also sample with φ = 0")
    parser.add_argument("--lock", default=None, help="hold this flock file while an arm trains and samples")
    parser.add_argument("--threads", type=int, default=1, help="1 is faster on a busy machine")
    parser.add_argument("--docs-tag", default="", help="suffix of the docs/ files, e.g. _500steps (another run)")
    parser.add_argument("--table-only", action="store_true", help="only (re)write the docs from OUT/*/result.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.table_only:
        for name in args.arms:
            result = (run_reference(out, args.lock) if name == "bundled"
                      else run_arm(name, out, args.steps, args.lock, args.without_phi))
            print(name, json.dumps({k: result[k] for k in ("pure black", "pure white", "control_all_three")}),
                  flush=True)
    write_docs(out, args.docs_tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
