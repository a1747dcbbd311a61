"""Training a ControlNet for the tiny model: `ldm-scratch train-controlnet --out runs/controlnet`.

The recipe of Zhang & Agrawala (2023), at the tiny model's size:
- data: the captioned shapes ("train" split); the condition is the Canny edge map of each image (control_images.py),
  so the ControlNet learns to put the shape where the edges are;
- the base model (text encoder, UNet, VAE) is frozen; the ControlNet starts as a copy of the UNet's encoder
  (ControlNet.from_unet) with its zero convolutions at 0, so step 0 reproduces the base model exactly;
- loss: the base model's, with the control added,  L = E‖ε − ε_θ(z_t, t, c, ControlNet(z_t, t, c, hint))‖²;
- the caption is replaced by "" with probability 0.5 (the paper's 50 %), so the ControlNet learns to read the
  hint by itself instead of leaning on the prompt;
- AdamW on the ControlNet's parameters only.

Every `log_every` steps the run records the mean |r_i| of each of the 13 (here 9 + 1) zero-convolution outputs on a
fixed probe batch: they start at exactly 0 and grow as the ControlNet learns (notebook 11 draws them). The text
encoder is frozen, so each distinct caption's context is computed once; the VAE's posteriors once too.

Outputs in --out: controlnet.safetensors (official layout, control_model.*), history.json (losses, norms, time).
Single process. The budget is `--core-minutes` of the process's CPU time (40 = 20 minutes on 2 cores) or `--minutes`
of wall time, whichever ends first; the run then stops and still saves.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint.controlnet_file import save_controlnet
from ..control import Control, ControlledUNet
from ..control_images import canny
from ..controlnet import ControlNet
from ..data import ShapesDataset, caption
from ..diffusion import classifier_free_guidance
from ..files import write_atomically
from ..pipeline import BUNDLED_MODEL
from ..samplers import get_sampler


@dataclass
class ControlNetTrainConfig:
    out_dir: str = "runs/controlnet"
    base_model: str = str(BUNDLED_MODEL)
    steps: int = 6000             # an upper bound: the budget below ends the bundled run first (2,287 steps)
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 100
    n_images: int = 4000
    caption_dropout: float = 0.5
    seed: int = 0
    log_every: int = 50
    core_minutes: float = 40.0     # CPU budget: 20 minutes on 2 cores = 40 core-minutes of this process's CPU time
    minutes: float = 28.0          # wall-clock cap (a busy shared machine gives the run less than 2 cores)
    init: str = ""                 # start from this ControlNet file's weights instead of the UNet's copy (to
                                   # continue a run; the optimizer starts afresh, with its warm-up)


def edge_hints(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, H, W] → Canny edge hints [N, 3, H, W] in [0, 1] (white edges on black)."""
    hints = [np.asarray(canny(image.permute(1, 2, 0).numpy())) for image in images]
    return torch.from_numpy(np.stack(hints)).permute(0, 3, 1, 2).float() / 255.0


def rendered(split: str, n: int, size: int, seed: int) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    """n images uint8 [n, 3, size, size] of a split and their (shape, colour, background)."""
    data = ShapesDataset(split, size=size, length=n, seed=seed)
    items = [data.sample(i) for i in range(n)]
    images = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image, _ in items])
    return images, [combo for _, combo in items]


@torch.no_grad()
def contexts_of(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, 77, D] contexts, one per caption, each distinct caption encoded once; the empty caption's [77, D])."""
    unique = sorted(set(captions))
    encoded = dict(zip(unique, pipe.text_encoder(pipe.tokenizer(unique))))
    return torch.stack([encoded[c] for c in captions]), pipe.text_encoder(pipe.tokenizer([""]))[0]


def zero_conv_norms(controlnet: ControlNet, unet, probe: dict) -> list[float]:
    """Mean |r_i| of every residual (the zero convs' outputs, the middle one last) on the probe batch."""
    with torch.no_grad():
        down, middle = controlnet(probe["z_t"], probe["t"], probe["context"], probe["hint"])
    return [float(r.abs().mean()) for r in down + [middle]]


def train_controlnet(cfg: ControlNetTrainConfig, *, force: bool = False, say=print) -> dict:
    """Run the recipe; returns the history (also written to OUT/history.json)."""
    from ..pipeline import load_pipeline
    out = Path(cfg.out_dir)
    target = out / "controlnet.safetensors"
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; choose another --out or pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.time(), time.process_time()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    pipe = load_pipeline(cfg.base_model, fast=False)
    for module in (pipe.text_encoder, pipe.unet, pipe.vae):
        module.eval().requires_grad_(False)                      # the base model is frozen
    config, schedule = pipe.config, pipe.schedule

    images, combos = rendered("train", cfg.n_images, config.image_size, cfg.seed)
    hints = edge_hints(images)                                   # [N, 3, H, W] in [0, 1]
    with torch.no_grad():
        posterior = [pipe.vae.encode(batch.float() / 127.5 - 1) for batch in images.split(256)]
    z_mean, z_std = torch.cat([p.mean for p in posterior]), torch.cat([p.std for p in posterior])
    contexts, empty = contexts_of(pipe, [caption(*c) for c in combos])
    say(f"data ready: {cfg.n_images} images, edges, latents, contexts ({time.time() - start:.0f} s)")

    controlnet = ControlNet.from_unet(pipe.unet, hint_widths=_hint_widths(config.vae.downsample_factor),
                                      downsample_factor=config.vae.downsample_factor).train()
    if cfg.init:
        from ..checkpoint.controlnet_file import load_controlnet
        controlnet.load_state_dict(load_controlnet(cfg.init).state_dict())     # strict: the same architecture
        say(f"continuing from {cfg.init}")
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=cfg.lr, weight_decay=0.0)
    probe = _probe(pipe, z_mean, hints, contexts, generator)
    history = {"config": asdict(cfg), "loss": [], "norm_steps": [], "zero_conv_norms": []}

    def record(step: int) -> None:
        history["norm_steps"].append(step)
        history["zero_conv_norms"].append(zero_conv_norms(controlnet, pipe.unet, probe))

    record(0)
    step = 0
    for step in range(1, cfg.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / max(cfg.warmup_steps, 1))        # linear warm-up, then flat
        index = torch.randint(cfg.n_images, (cfg.batch_size,), generator=generator)
        z0 = pipe.latent_scale * (z_mean[index] + z_std[index] * torch.randn(z_mean[index].shape, generator=generator))
        t = torch.randint(schedule.n_train_steps, (cfg.batch_size,), generator=generator)
        eps = torch.randn(z0.shape, generator=generator)
        z_t = schedule.q_sample(z0, t, eps)                                        # √ᾱ_t z_0 + √(1−ᾱ_t) ε
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        context = torch.where(drop[:, None, None], empty, contexts[index])          # caption → "" (50 %)
        control = controlnet(z_t, t, context, hints[index])
        loss = F.mse_loss(pipe.unet(z_t, t, context, control=control), eps)       # ‖ε − ε_θ(z_t, t, c, control)‖²
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["loss"].append(loss.item())
        if step % cfg.log_every == 0:
            record(step)
            say(f"step {step} loss {np.mean(history['loss'][-cfg.log_every:]):.4f} "
                f"mid-norm {history['zero_conv_norms'][-1][-1]:.4f} ({time.time() - start:.0f} s, "
                f"{time.process_time() - cpu_start:.0f} CPU s)")
        if time.process_time() - cpu_start > 60 * cfg.core_minutes or time.time() - start > 60 * cfg.minutes:
            say(f"stopping at step {step}: the budget ({cfg.core_minutes} core-minutes, {cfg.minutes} wall "
                "minutes) is spent")
            break
    history.update(steps_done=step, seconds=time.time() - start, cpu_seconds=time.process_time() - cpu_start,
                   model=str(target))
    save_controlnet(target, controlnet.eval(), overwrite=True)
    write_atomically(out / "history.json", json.dumps(history).encode())
    say(f"saved {target} after {step} steps in {history['seconds']:.0f} s ({history['cpu_seconds']:.0f} CPU s)")
    return history


def _hint_widths(factor: int) -> tuple[int, ...]:
    """SD v1's hint widths (16, 32, 96, 256), cut to one stride-2 stage per factor 2 of the VAE."""
    return (16, 32, 96, 256)[:factor.bit_length()]


def _probe(pipe, z_mean, hints, contexts, generator) -> dict:
    """A fixed batch for the zero-conv norms: the first 16 training items at t = 500."""
    index = torch.arange(min(16, len(z_mean)))
    z0 = pipe.latent_scale * z_mean[index]
    t = torch.full((len(index),), 500)
    z_t = pipe.schedule.q_sample(z0, t, torch.randn(z0.shape, generator=generator))
    return {"z_t": z_t, "t": t, "context": contexts[index], "hint": hints[index]}


@torch.no_grad()
def generate_controlled(pipe, controlnet: ControlNet | None, captions: list[str], hints: torch.Tensor | None, *,
                        seed: int = 0, scale: float = 1.0, guidance_scale: float = 7.5, steps: int = 20,
                        sampler: str = "dpmpp_2m") -> torch.Tensor:
    """uint8 images [B, 3, H, W] for `captions` with hints [B, 3, H, W] in [0, 1] (controlnet None: no control).
    Noise from `seed` on the CPU; CFG against ∅ = CLIP(""), as training/sampling.generate."""
    config = pipe.config
    n, side = len(captions), config.image_size // config.vae.downsample_factor
    context = torch.cat([pipe.text_encoder(pipe.tokenizer([""] * n)), pipe.text_encoder(pipe.tokenizer(captions))])
    sampler = get_sampler(sampler, schedule=pipe.schedule)
    controls = [] if controlnet is None else [Control(controlnet, hints, scale)]
    unet = ControlledUNet(pipe.unet, controls, guess_mode=False, guided=True, n_steps=steps)

    def eps_model(z_t, t):
        eps_uncond, eps_cond = unet(torch.cat([z_t, z_t]), t, context).chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)

    noise = torch.randn(n, config.latent_channels, side, side, generator=torch.Generator().manual_seed(seed))
    z0 = sampler.sample(eps_model, noise, steps, callback=unet.counting())
    x = pipe.vae.decode(z0 / pipe.latent_scale)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ControlNetTrainConfig()
    parser.add_argument("--out", dest="out_dir", default=defaults.out_dir, help="run directory")
    for name, value in asdict(defaults).items():
        if name != "out_dir":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                                help=f"default {value}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--force", action="store_true", help="replace OUT/controlnet.safetensors if it exists")


def cmd_train_controlnet(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {name: getattr(args, name) for name in asdict(ControlNetTrainConfig())}
    train_controlnet(ControlNetTrainConfig(**fields), force=args.force)
    return 0
