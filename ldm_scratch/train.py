"""Train a latent diffusion model from scratch on the captioned-shapes data: the whole recipe in one file.

This is how the bundled `weights/tiny-shapes.safetensors` was made, with the very same `clip.py`, `unet.py` and
`vae.py` classes that load the official SD v1 weights, only narrower (`configs.tiny_config()`).

    python -m ldm_scratch.train --out runs/tiny                       # or: ldm-scratch train --out runs/tiny
    torchrun --nproc_per_node 2 -m ldm_scratch.train --out runs/ddp   # data-parallel (gloo on CPU, nccl on GPU)

Two stages, as in Rombach et al. 2022 (the seed's §4):

Stage 1 — the KL autoencoder. x [B, 3, 64, 64] in [−1, 1] → q(z|x) = N(μ, σ²) over z [B, 4, 16, 16] → x̂ = D(z):

    L_vae = mean|x − x̂| + mean(x − x̂)²  +  kl_weight · KL(q(z|x) ‖ N(0, I)) / (3·H·W)

(no GAN or LPIPS term: flat colours and sharp edges are all this data has). The tiny KL weight only keeps the latents
from drifting to huge values; the autoencoder is essentially deterministic.

Stage 2 — the text encoder and the UNet, jointly, on latents of the frozen autoencoder:

    z_0 = latent_scale · z,  z ~ q(z|x)         latent_scale = 1 / std(z) over the training set (SD v1: 0.18215)
    t ~ U{0, …, T−1},  ε ~ N(0, I),  z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε                    (eq 4.1, Schedule.q_sample)
    c = CLIP(tokens(caption)), caption replaced by "" with probability caption_dropout
    L = E ‖ε − ε_θ(z_t, t, c)‖²                                                       (eq 4.3, diffusion.eps_loss)

ε also gets a small random constant per image and channel ("offset noise", `training_noise`): without it the
network reads the overall colour off z_T, which at sampling time is noise (the docstring there says why).

Dropping captions teaches the same network the unconditional ε_θ(z_t, t, ∅) with ∅ = CLIP("") — exactly the
"negative prompt" SD feeds at sampling time — so classifier-free guidance (eq 4.4) works.

Speed: the training images are rendered once (a fixed, seeded set), their latents' μ and σ computed once after
stage 1, and each caption tokenised once; a step then costs one UNet + text-encoder forward/backward on [B, 4, 16, 16].

Reproducibility: every random number (initial weights, batches, t, ε, dropout, posterior samples) comes from seeded
generators whose states are saved in the checkpoint, so an interrupted run resumed from `ckpt.pt` continues exactly
as the uninterrupted one would (on the same device and thread count). Under DDP each rank draws its own batches
(generator seeded with seed + rank) and gradients are averaged; the global batch stays `batch_size`.

Outputs in `out_dir`: `ckpt.pt` (resumable: models, optimizer, step, RNG states), `samples/*.png` (periodic grids:
one row per caption, one column per seed), `log.txt`, and the final `model.safetensors` in the official
single-file layout (config in the metadata), loadable with `ldm_scratch.load_pipeline(path)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import save_official
from .clip import CLIPTextModel
from .configs import ModelConfig, tiny_config
from .data import ShapesDataset, caption, heldout_combinations
from .diffusion import Schedule, ScheduleConfig, classifier_free_guidance, eps_loss
from .samplers import get_sampler
from .tokenizer import load_tokenizer
from .unet import UNet
from .vae import VAE


@dataclass
class TrainConfig:
    """Everything that decides a run; the defaults are the recipe of the bundled model."""
    out_dir: str = "runs/tiny"
    model: ModelConfig = field(default_factory=tiny_config)
    seed: int = 0
    device: str = "cpu"
    n_images: int = 12_000          # the fixed training set, rendered once
    # stage 1: the autoencoder
    vae_steps: int = 1_500
    vae_batch_size: int = 16
    vae_lr: float = 3e-3
    kl_weight: float = 1e-5
    # stage 2: text encoder + UNet
    steps: int = 2_500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    caption_dropout: float = 0.1    # p(caption → "") so the model also learns ε_θ(z_t, t, ∅) for CFG
    offset_noise: float = 0.1       # std of a per-image, per-channel constant added to ε (see stage 2 below)
    grad_clip: float = 1.0
    # bookkeeping
    sample_every: int = 500         # sample grid every N steps of stage 2 (0: never)
    checkpoint_every: int = 500     # ckpt.pt every N steps (either stage)
    sample_steps: int = 30          # grids use the pipeline's defaults: DPM-Solver++ 2M, 30 steps, guidance 7.5
    guidance_scale: float = 7.5
    progress: bool = True

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        values["model"] = json.loads(self.model.to_json())
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        values = json.loads(text)
        values["model"] = ModelConfig.from_json(json.dumps(values["model"]))
        return cls(**values)


# ------------------------------------------------------------------------------------------------------------------
# distributed plumbing: a no-op unless launched by torchrun (which sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*)
# ------------------------------------------------------------------------------------------------------------------

def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Joins the process group when torchrun started us; gloo on CPU, nccl on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if world_size == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), world_size, device


def wrap(module: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """DDP averages gradients across ranks during backward(); a single process trains the module itself."""
    if world_size == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


# ------------------------------------------------------------------------------------------------------------------
# the two trainable systems, as modules so DDP can wrap them
# ------------------------------------------------------------------------------------------------------------------

class AutoencoderLoss(nn.Module):
    """forward(x [B, 3, H, W], generator) → (L_vae, reconstruction error) for stage 1."""

    def __init__(self, vae: VAE, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x)
        x_rec = self.vae.decode(posterior.sample(generator))
        rec = (x - x_rec).abs().mean() + ((x - x_rec) ** 2).mean()      # mean|x − x̂| + mean(x − x̂)²
        kl = posterior.kl().mean() / x[0].numel()                        # KL per image, per pixel value
        return rec + self.kl_weight * kl, rec


class TextToEps(nn.Module):
    """ε_θ(z_t, t, c(ids)): the text encoder and the UNet as one module, trained jointly in stage 2."""

    def __init__(self, text_encoder: CLIPTextModel, unet: UNet):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(z_t, t, self.text_encoder(input_ids))  # [B, 4, h, w]


def build_models(config: ModelConfig, seed: int) -> tuple[CLIPTextModel, UNet, VAE]:
    """Fresh networks with PyTorch's default initialisation, drawn from `seed`."""
    torch.manual_seed(seed)
    return CLIPTextModel(config.text_encoder), UNet(config.unet), VAE(config.vae)


def schedule_of(config: ModelConfig) -> Schedule:
    return Schedule(ScheduleConfig(config.num_train_timesteps, config.beta_start, config.beta_end))


def training_noise(shape: torch.Size, offset: float, generator: torch.Generator) -> torch.Tensor:
    """The noise ε [B, C, h, w] that stage 2 adds to z_0 and asks the UNet to predict: ε ~ N(0, I), plus, with
    offset > 0, "offset noise" (Guttenberg 2023): offset · δ with δ ~ N(0, 1) drawn per image and channel and
    constant over the latent.

    Why: the mean of a latent channel over h×w pixels is where an image's overall colour lives, and plain noise
    hides it badly — its mean has std 1/√(h·w) only (1/16 for 16×16 latents). SD's schedule stops at ᾱ_T = 0.0047,
    so at t = T the signal's share of that mean, √ᾱ_T·z̄_0 ≈ 0.07·z̄_0, is as large as the noise's: the network
    learns to read the background colour from z_T itself. At sampling time z_T is pure noise, so the colour comes
    from the noise instead of the caption. The offset raises the noise's share of every channel mean (to std
    √(1/(h·w) + offset²)), so the network learns to take colour from the text.
    """
    eps = torch.randn(shape, generator=generator)
    if offset:
        eps = eps + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return eps


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0: lr = peak · ½(1 + cos(π·progress))."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ------------------------------------------------------------------------------------------------------------------
# data: rendered once, tokenised once
# ------------------------------------------------------------------------------------------------------------------

def render_training_set(n_images: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The fixed training set: images uint8 [N, 3, size, size] and their captions (the "train" split)."""
    dataset = ShapesDataset("train", size=size, length=n_images, seed=seed)
    images = torch.empty(n_images, 3, size, size, dtype=torch.uint8)
    captions = []
    for i in range(n_images):
        image, combo = dataset.sample(i)
        images[i] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        captions.append(caption(*combo))
    return images, captions


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] → float [B, 3, H, W] in [−1, 1]: x = 2·pixel/255 − 1."""
    return images.float() / 127.5 - 1.0


def tokenize_all(tokenizer, captions: list[str]) -> torch.Tensor:
    """[N, 77] token ids; each distinct caption is tokenised once (the data set has only 140 of them)."""
    unique = sorted(set(captions))
    ids = dict(zip(unique, tokenizer(unique)))
    return torch.stack([ids[c] for c in captions])


# ------------------------------------------------------------------------------------------------------------------
# sampling (for the periodic grids and the tests; the pipeline does the same for users)
# ------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(text_encoder, unet, vae, tokenizer, config: ModelConfig, captions: list[str], *, seed: int = 0,
             guidance_scale: float = 7.5, steps: int = 30, sampler: str = "dpmpp_2m") -> torch.Tensor:
    """Images for `captions` (one each): uint8 [B, 3, H, W]. Noise ε [B, 4, h, w] is drawn on the CPU from `seed`.

    Classifier-free guidance (eq 4.4): ε̂ = ε_θ(z_t, t, ∅) + guidance_scale · (ε_θ(z_t, t, c) − ε_θ(z_t, t, ∅)).
    """
    device = next(unet.parameters()).device
    n, side = len(captions), config.image_size // config.vae.downsample_factor
    context = text_encoder(tokenizer(captions).to(device))            # [B, 77, D]
    empty = text_encoder(tokenizer([""] * n).to(device))              # ∅ = CLIP("")
    both = torch.cat([empty, context])

    def eps_model(z_t, t):
        eps_uncond, eps_cond = unet(torch.cat([z_t, z_t]), t, both).chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, config.latent_channels, side, side, generator=generator).to(device)
    z0 = get_sampler(sampler, schedule=schedule_of(config)).sample(eps_model, noise, steps, generator=generator)
    x = vae.decode(z0 / config.latent_scale)                          # z = z_0 / latent_scale
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # pixel = (x + 1)·127.5


def save_grid(images: torch.Tensor, rows: int, path: Path) -> None:
    """uint8 [rows·cols, 3, H, W] (row-major) → one PNG."""
    grid = torch.cat([torch.cat(list(row), dim=2) for row in images.split(images.shape[0] // rows)], dim=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


GRID_CAPTIONS = [caption("circle", "red", "blue"), caption("square", "yellow", "green"),
                 caption("triangle", "white", "purple"), caption("star", "blue", "white"),
                 caption("ring", "purple", "yellow")] + [caption(*c) for c in heldout_combinations()[:3]]


def sample_grid(text_encoder, unet, vae, tokenizer, cfg: TrainConfig, path: Path, n_seeds: int = 4) -> None:
    """One row per GRID_CAPTIONS entry (the last three are held-out combinations), one column per seed."""
    was_training = [m.training for m in (text_encoder, unet)]
    text_encoder.eval(), unet.eval()
    columns = [generate(text_encoder, unet, vae, tokenizer, cfg.model, GRID_CAPTIONS, seed=s,
                        guidance_scale=cfg.guidance_scale, steps=cfg.sample_steps) for s in range(n_seeds)]
    images = torch.stack(columns, dim=1).flatten(0, 1)  # [captions · seeds, 3, H, W], row-major
    save_grid(images, len(GRID_CAPTIONS), path)
    for module, mode in zip((text_encoder, unet), was_training):
        module.train(mode)


# ------------------------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)  # an interrupted save never replaces a good checkpoint


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file: it holds the config object


# ------------------------------------------------------------------------------------------------------------------
# the training loop
# ------------------------------------------------------------------------------------------------------------------

# the fields that only stage 2 reads: `new_stage2` may change them while stage 2 has not begun
STAGE2_FIELDS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "caption_dropout", "offset_noise",
                 "sample_every")


def train(cfg: TrainConfig, resume: bool = True, stop_at: int | None = None, new_stage2: bool = False) -> dict:
    """Run (or resume) both stages; returns {"vae_loss": [...], "loss": [...], "model": Path or None, ...}.

    With resume=True and `out_dir/ckpt.pt` present, training continues from it (its TrainConfig wins, except
    out_dir and progress, so a moved run directory resumes in place).
    stop_at: checkpoint and return after this many optimizer steps in all (stage 1's, then stage 2's): a
    time-boxed run, resumed later by calling train again.
    new_stage2: when resuming a checkpoint whose stage 2 has not begun (a finished or time-boxed VAE), take stage
    2's recipe (STAGE2_FIELDS) from `cfg` instead of the checkpoint — one trained autoencoder, several stage 2s.
    """
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    checkpoint = load_checkpoint(ckpt_path) if resume and ckpt_path.is_file() else None
    if checkpoint is not None:  # the run's recipe is the checkpoint's; only where it lives and the bars are ours
        ours = cfg
        cfg = dataclasses.replace(TrainConfig.from_json(checkpoint["train_config"]), out_dir=cfg.out_dir,
                                  progress=cfg.progress)
        if new_stage2:
            if checkpoint["stage"] != "vae":
                raise ValueError(f"{ckpt_path} is already in stage 2 (step {checkpoint['step']}): its recipe "
                                 f"cannot change now; drop new_stage2 (--new-stage2) to resume it as it was")
            cfg = dataclasses.replace(cfg, **{name: getattr(ours, name) for name in STAGE2_FIELDS})
    rank, world_size, device = setup_distributed(cfg.device)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(cfg.to_json())
    if cfg.vae_batch_size % world_size or cfg.batch_size % world_size:
        raise ValueError(f"batch sizes ({cfg.vae_batch_size}, {cfg.batch_size}) must divide by the number of "
                         f"processes ({world_size})")
    log = (out_dir / "log.txt").open("a") if is_main else None
    if log is not None:
        print(f"{'resuming' if checkpoint else 'starting'} on {device}, world size {world_size}, "
              f"{torch.get_num_threads()} threads", file=log, flush=True)

    def say(message: str) -> None:
        if log is not None:
            print(message, file=log, flush=True)

    model_config = cfg.model
    text_encoder, unet, vae = build_models(model_config, cfg.seed)
    text_encoder, unet, vae = text_encoder.to(device), unet.to(device), vae.to(device)
    tokenizer = load_tokenizer()
    start = time.time()
    images, captions = render_training_set(cfg.n_images, model_config.image_size, cfg.seed)
    say(f"rendered {cfg.n_images} images in {time.time() - start:.1f} s")
    # each rank draws its own batches; all share the initial weights (same seed) and DDP keeps them equal
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    history = {"vae_loss": [], "loss": [], "rank": rank, "world_size": world_size, "model": None}

    stage, step = "vae", 0
    vae_optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    if checkpoint is not None:
        if len(checkpoint["generators"]) != world_size:
            raise ValueError(f"{ckpt_path} was written by {len(checkpoint['generators'])} process(es) but this run "
                             f"has {world_size}: resume with the same number of processes (or pass --no-resume)")
        stage, step = checkpoint["stage"], checkpoint["step"]
        vae.load_state_dict(checkpoint["vae"])
        text_encoder.load_state_dict(checkpoint["text_encoder"])
        unet.load_state_dict(checkpoint["unet"])
        generator.set_state(checkpoint["generators"][rank])
        history["vae_loss"], history["loss"] = checkpoint["vae_loss"], checkpoint["loss"]
        if stage == "vae":
            vae_optimizer.load_state_dict(checkpoint["optimizer"])
        model_config = ModelConfig.from_json(checkpoint["model_config"])

    def checkpoint_now(stage_now: str, step_now: int, optimizer) -> None:
        generators = [generator.get_state()]
        if world_size > 1:  # rank 0 writes every rank's generator, so a resumed DDP run draws the same batches
            generators = [None] * world_size
            dist.all_gather_object(generators, generator.get_state())
        if is_main:
            save_checkpoint(ckpt_path, stage=stage_now, step=step_now, train_config=cfg.to_json(),
                            model_config=model_config.to_json(), vae=vae.state_dict(),
                            text_encoder=text_encoder.state_dict(), unet=unet.state_dict(),
                            optimizer=optimizer.state_dict(), generators=generators,
                            vae_loss=history["vae_loss"], loss=history["loss"])

    # -- stage 1: the autoencoder ---------------------------------------------------------------------------------
    if stage == "vae":
        vae.train()
        model = wrap(AutoencoderLoss(vae, cfg.kl_weight), world_size, device)
        per_rank = cfg.vae_batch_size // world_size
        bar = tqdm(range(step, cfg.vae_steps), initial=step, total=cfg.vae_steps, desc="stage 1: VAE",
                   disable=not (cfg.progress and is_main))
        for step in bar:
            lr = learning_rate(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup_steps)
            for group in vae_optimizer.param_groups:
                group["lr"] = lr
            index = torch.randint(cfg.n_images, (per_rank,), generator=generator)
            x = to_model_range(images[index]).to(device)                       # [B, 3, H, W] in [−1, 1]
            loss, rec = model(x, generator)
            vae_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
            vae_optimizer.step()
            history["vae_loss"].append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}", rec=f"{rec.item():.4f}")
            if step % 100 == 0:
                say(f"vae step {step} loss {loss.item():.5f} rec {rec.item():.5f} lr {lr:.2e}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.vae_steps \
                    or step + 1 == stop_at:
                checkpoint_now("vae", step + 1, vae_optimizer)
            if step + 1 == stop_at:
                bar.close()
                return history
        bar.close()
        stage, step = "diffusion", 0
        say(f"stage 1 done at {time.time() - start:.0f} s")

    # -- between the stages: freeze the VAE, encode the training set once, choose the latent scale -----------------
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        moments = [vae.encode(to_model_range(batch).to(device)) for batch in images.split(256)]
        z_mean = torch.cat([p.mean for p in moments])                         # [N, 4, h, w]
        z_std = torch.cat([p.std for p in moments])
    if checkpoint is None or checkpoint["stage"] == "vae":
        # latent_scale = 1 / std(z): the diffusion process assumes data of unit variance (SD v1: 1/5.49 = 0.18215);
        # the std is over all latent numbers of the training set (posterior samples: what training sees)
        z = z_mean + z_std * torch.randn(z_mean.shape, generator=torch.Generator().manual_seed(cfg.seed))
        model_config = dataclasses.replace(model_config, latent_scale=float(1.0 / z.std()))
        say(f"latent scale {model_config.latent_scale:.5f} (std of latents {z.std():.4f})")
    latent_scale = model_config.latent_scale
    input_ids = tokenize_all(tokenizer, captions)                            # [N, 77]
    empty_ids = tokenizer([""])[0]                                           # ∅: BOS, EOS, padding

    # -- stage 2: text encoder + UNet on latents ------------------------------------------------------------------
    schedule = schedule_of(model_config)
    text_encoder.train(), unet.train()
    model = wrap(TextToEps(text_encoder, unet), world_size, device)
    optimizer = torch.optim.AdamW(list(text_encoder.parameters()) + list(unet.parameters()), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    if checkpoint is not None and checkpoint["stage"] == "diffusion":
        optimizer.load_state_dict(checkpoint["optimizer"])
    if step == 0 and cfg.checkpoint_every:  # the end of stage 1: resuming from here skips it
        checkpoint_now("diffusion", 0, optimizer)
    per_rank = cfg.batch_size // world_size
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="stage 2: diffusion",
               disable=not (cfg.progress and is_main))
    for step in bar:
        lr = learning_rate(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(cfg.n_images, (per_rank,), generator=generator)
        noise_z = torch.randn(z_mean[index].shape, generator=generator)
        z0 = latent_scale * (z_mean[index] + z_std[index] * noise_z.to(device))   # z_0 = scale · z, z ~ q(z|x)
        t = torch.randint(schedule.n_train_steps, (per_rank,), generator=generator)
        eps = training_noise(z0.shape, cfg.offset_noise, generator).to(device)   # ε (+ offset · δ)
        z_t = schedule.q_sample(z0, t, eps)                                      # z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
        drop = torch.rand(per_rank, generator=generator) < cfg.caption_dropout   # caption → "" (CFG)
        ids = torch.where(drop[:, None], empty_ids, input_ids[index]).to(device)
        loss = eps_loss(eps, model(z_t, t.to(device), ids))                      # L = E‖ε − ε_θ(z_t, t, c)‖²
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(text_encoder.parameters()) + list(unet.parameters()), cfg.grad_clip)
        optimizer.step()
        history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if step % 100 == 0:
            say(f"step {step} loss {loss.item():.5f} lr {lr:.2e} ({time.time() - start:.0f} s)")
        done = step + 1
        if is_main and cfg.sample_every and done % cfg.sample_every == 0:
            sample_grid(text_encoder, unet, vae, tokenizer, dataclasses.replace(cfg, model=model_config),
                        out_dir / "samples" / f"step_{done:06d}.png")
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 or cfg.vae_steps + done == stop_at:
            checkpoint_now("diffusion", done, optimizer)
        if cfg.vae_steps + done == stop_at:
            bar.close()
            return history
    bar.close()

    if cfg.checkpoint_every and cfg.steps % cfg.checkpoint_every:
        checkpoint_now("diffusion", cfg.steps, optimizer)
    history["seconds"] = time.time() - start
    if is_main:
        text_encoder.eval(), unet.eval()
        history["model"] = save_official(out_dir / "model.safetensors", text_encoder, unet, vae, model_config,
                                         overwrite=True)
        say(f"done in {history['seconds']:.0f} s: {history['model']}")
        log.close()
    if world_size > 1:
        dist.barrier()
    history["model_config"] = model_config
    return history


# ------------------------------------------------------------------------------------------------------------------
# command line: `ldm-scratch train …`, `python -m ldm_scratch.train …`, `torchrun … -m ldm_scratch.train …`
# ------------------------------------------------------------------------------------------------------------------

def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (dashes for underscores); the defaults are the bundled model's recipe."""
    defaults = TrainConfig()
    parser.add_argument("--out", dest="out_dir", default=defaults.out_dir, help="run directory (checkpoint, grids)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("out_dir", "model", "progress"):
            continue
        value = getattr(defaults, f.name)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value,
                            help=f"default {value}")
    parser.add_argument("--model-config", default=None,
                        help="JSON file with a ModelConfig (ModelConfig.to_json()); default: configs.tiny_config()")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/ckpt.pt exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--new-stage2", action="store_true",
                        help="resuming a run still in stage 1 (or at its end): use this command's stage-2 flags "
                             f"({', '.join('--' + n.replace('_', '-') for n in STAGE2_FIELDS)}) instead of the "
                             "checkpoint's")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per process (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--export", default=None, help="also copy the final model.safetensors to this path")


def cmd_train(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name not in ("model", "progress")}
    if args.model_config:
        values["model"] = ModelConfig.from_json(Path(args.model_config).read_text())
    cfg = TrainConfig(**values, progress=not args.no_progress)
    if args.threads:
        torch.set_num_threads(args.threads)
    history = train(cfg, resume=not args.no_resume, new_stage2=args.new_stage2)
    if history["model"] is not None:
        print(f"trained in {history['seconds']:.0f} s; model: {history['model']}")
        if args.export:
            import shutil
            shutil.copyfile(history["model"], args.export)
            print(f"copied to {args.export}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_scratch.train", description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    return cmd_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
