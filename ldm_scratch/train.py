"""Train a latent diffusion model from scratch on the captioned-shapes data: the recipe, stage by stage.

This is how the bundled `ldm_scratch/bundled/tiny-shapes.safetensors` was made, with the very same `clip.py`,
`unet.py` and `vae.py` classes that load the official SD v1 weights, only narrower (`configs.tiny_config()`).

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

With `prediction="v"` (`--prediction v`, SD 2's 768-v) the target is the velocity instead (Salimans & Ho 2022):
L = E ‖v − v_θ(z_t, t, c)‖², v = √ᾱ_t ε − √(1−ᾱ_t) z_0; with `zero_snr` (`--zero-snr`) the β schedule is rescaled
so that ᾱ_T = 0 (Lin et al. 2023, diffusion.rescale_zero_terminal_snr). `init` fine-tunes stage 2 from a model file
(stage 1 skipped; its autoencoder and latent scale kept) — how scripts/zero_snr_experiment.py compares them.

ε also gets a small random constant per image and channel ("offset noise", `training_noise`): without it the
network reads the overall colour off z_T, which at sampling time is noise (the docstring there says why).

Dropping captions teaches the same network the unconditional ε_θ(z_t, t, ∅) with ∅ = CLIP("") — exactly the
"negative prompt" SD feeds at sampling time — so classifier-free guidance (eq 4.4) works.

Speed: the training images are rendered once (a fixed, seeded set), their latents' μ and σ computed once after
stage 1, and each caption tokenised once; a step then costs one UNet + text-encoder forward/backward on [B, 4, 16, 16].

Reproducibility: every random number (initial weights, batches, t, ε, dropout, posterior samples) comes from seeded
generators whose states are saved in the checkpoint, so an interrupted run resumed from its checkpoint continues
exactly as the uninterrupted one would (on the same device and thread count). Under DDP each rank draws its own
batches (generator seeded with seed·1000 + rank) and gradients are averaged; the global batch stays `batch_size`.

Outputs in `out_dir`: `ckpt.safetensors` (resumable: models, optimizer, step, RNG states; tensors + JSON, no
pickle, written atomically; a resume must keep the run's recipe), `samples/*.png` (periodic grids:
one row per caption, one column per seed), `log.txt`, and the final `model.safetensors` in the official
single-file layout (config in the metadata), loadable with `ldm_scratch.load_pipeline(path)`.

This file is the recipe: the losses, the two stages' steps and loops, and `train()`, which runs them in order
(start → stage 1 → latents → stage 2 → export). The plumbing lives in `training/` (config, data set, run state and
checkpoints, sample grids, the `train` command); every public name there is importable from here.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoint import load_models, save_official
from .clip import CLIPTextModel
from .configs import ModelConfig
from .diffusion import Schedule, eps_loss
from .tokenizer import load_tokenizer
from .unet import UNet
from .vae import VAE
# the plumbing, re-exported: `from ldm_scratch.train import X` works for every public name of training/
from .training.config import STAGE2_FIELDS, TrainConfig
from .training.dataset import encode_training_set, latent_std, render_training_set, to_model_range, tokenize_all
from .training.run import Run, load_checkpoint, open_checkpoint, save_checkpoint, setup_distributed, wrap
from .files import write_atomically
from .training.sampling import GRID_CAPTIONS, generate, sample_grid, save_grid
from .training.command import add_train_arguments, cmd_train, train_main as main  # the `train` command


# ------------------------------------------------------------------------------------------------------------------
# what is optimised: the two trainable systems (as modules, so DDP can wrap them), the noise, the learning rate
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


def training_schedule(model_config: ModelConfig, cfg: TrainConfig) -> Schedule:
    """The model's β schedule and prediction type, rescaled to zero terminal SNR when cfg.zero_snr asks."""
    config = model_config.schedule().config
    zero_snr = cfg.zero_snr or config.rescale_zero_terminal_snr
    return Schedule(dataclasses.replace(config, rescale_zero_terminal_snr=zero_snr))


def training_target(schedule: Schedule, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output [B, 4, h, w]: ε itself, or for a v-predicting schedule the velocity."""
    if schedule.config.prediction_type == "v_prediction":
        return schedule.v_from_x0_eps(z0, t, eps)  # v = √ᾱ_t ε − √(1−ᾱ_t) z_0  (Salimans & Ho 2022)
    return eps


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0: lr = peak · ½(1 + cos(π·progress))."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, parameters: Iterable[nn.Parameter],
                   lr: float, grad_clip: float) -> None:
    """One update at learning rate `lr`: gradients of `loss`, their global norm clipped to `grad_clip`, AdamW."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()


# ------------------------------------------------------------------------------------------------------------------
# start: processes, run directory, networks, data
# ------------------------------------------------------------------------------------------------------------------

def start_run(cfg: TrainConfig, checkpoint: dict | None) -> Run:
    """Join the processes, open the run directory and its log, build the networks and render the training set."""
    rank, world_size, device = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(out_dir / "config.json", cfg.to_json().encode())
    if cfg.vae_batch_size % world_size or cfg.batch_size % world_size:
        raise ValueError(f"batch sizes ({cfg.vae_batch_size}, {cfg.batch_size}) must divide by the number of "
                         f"processes ({world_size})")
    log = (out_dir / "log.txt").open("a") if rank == 0 else None
    if log is not None:
        print(f"{'resuming' if checkpoint else 'starting'} on {device}, world size {world_size}, "
              f"{torch.get_num_threads()} threads", file=log, flush=True)
        for note in (checkpoint or {}).get("notes", []):  # resume flags that were applied: the user should know
            print(note, file=log, flush=True)
            print(note, file=sys.stderr)
    model_config = cfg.model
    if cfg.init:  # fine-tune: the file's networks and config (with its latent scale) instead of fresh ones
        loaded = load_models(cfg.init)
        text_encoder, unet, vae, model_config = loaded.text_encoder, loaded.unet, loaded.vae, loaded.config
    else:
        text_encoder, unet, vae = build_models(cfg.model, cfg.seed)
    # what the UNet will predict, so that the exported file says it (ModelConfig.prediction_type)
    model_config = dataclasses.replace(model_config, prediction_type=cfg.prediction_type,
                                       rescale_zero_terminal_snr=cfg.zero_snr or model_config.rescale_zero_terminal_snr)
    text_encoder, unet, vae = (m.float().to(device) for m in (text_encoder, unet, vae))
    tokenizer = load_tokenizer()
    start = time.time()
    images, captions = render_training_set(cfg.n_images, model_config.image_size, cfg.seed, cfg.extreme_backgrounds)
    # each rank draws its own batches; all share the initial weights (same seed) and DDP keeps them equal
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    history = {"vae_loss": [], "loss": [], "rank": rank, "world_size": world_size, "model": None}
    run = Run(cfg, checkpoint, rank, world_size, device, log, text_encoder, unet, vae, tokenizer, images, captions,
              generator, start, model_config, history)
    run.say(f"rendered {cfg.n_images} images in {time.time() - start:.1f} s")
    return run


# ------------------------------------------------------------------------------------------------------------------
# stage 1: the autoencoder
# ------------------------------------------------------------------------------------------------------------------

def autoencoder_step(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer,
                     step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step of stage 1 on a fresh batch: (L_vae, reconstruction error, learning rate)."""
    cfg = run.cfg
    lr = learning_rate(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup_steps)
    index = torch.randint(cfg.n_images, (cfg.vae_batch_size // run.world_size,), generator=run.generator)
    x = to_model_range(run.images[index]).to(run.device)                   # [B, 3, H, W] in [−1, 1]
    loss, rec = model(x, run.generator)
    optimizer_step(optimizer, loss, run.vae.parameters(), lr, cfg.grad_clip)
    return loss, rec, lr


def train_autoencoder(run: Run, optimizer: torch.optim.Optimizer, first_step: int, stop_at: int | None) -> bool:
    """Stage 1 from `first_step` to cfg.vae_steps, checkpointing on the way; True if it stopped at `stop_at`."""
    cfg = run.cfg
    run.vae.train()
    model = wrap(AutoencoderLoss(run.vae, cfg.kl_weight), run.world_size, run.device)
    bar = tqdm(range(first_step, cfg.vae_steps), initial=first_step, total=cfg.vae_steps, desc="stage 1: VAE",
               disable=not (cfg.progress and run.is_main))
    for step in bar:
        loss, rec, lr = autoencoder_step(run, model, optimizer, step)
        run.history["vae_loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", rec=f"{rec.item():.4f}")
        if step % 100 == 0:
            run.say(f"vae step {step} loss {loss.item():.5f} rec {rec.item():.5f} lr {lr:.2e}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.vae_steps \
                or step + 1 == stop_at:
            run.checkpoint_now("vae", step + 1, optimizer)
        if step + 1 == stop_at:
            bar.close()
            return True
    bar.close()
    run.say(f"stage 1 done at {time.time() - run.start:.0f} s")
    return False


# ------------------------------------------------------------------------------------------------------------------
# between the stages: freeze the VAE, encode the training set once, choose the latent scale, tokenise the captions
# ------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LatentData:
    """Stage 2's training set, prepared once: the posterior q(z|x) = N(μ, σ²) of every image and its caption ids."""
    z_mean: torch.Tensor            # μ [N, 4, h, w]
    z_std: torch.Tensor             # σ [N, 4, h, w]
    input_ids: torch.Tensor         # [N, 77]
    empty_ids: torch.Tensor         # [77]: ∅ = BOS, EOS, padding


def prepare_latents(run: Run) -> LatentData:
    """Freeze the autoencoder, encode every image once and, when stage 1 has just ended (not on resuming stage 2,
    whose checkpoint holds it), set latent_scale = 1 / std(z) in run.model_config."""
    run.vae.eval().requires_grad_(False)
    z_mean, z_std = encode_training_set(run.vae, run.images, run.device)
    if not run.cfg.init and (run.checkpoint is None or run.checkpoint["stage"] == "vae"):
        std = latent_std(z_mean, z_std, run.cfg.seed)
        run.model_config = dataclasses.replace(run.model_config, latent_scale=float(1.0 / std))
        run.say(f"latent scale {run.model_config.latent_scale:.5f} (std of latents {std:.4f})")
    return LatentData(z_mean, z_std, tokenize_all(run.tokenizer, run.captions), run.tokenizer([""])[0])


# ------------------------------------------------------------------------------------------------------------------
# stage 2: text encoder + UNet on latents
# ------------------------------------------------------------------------------------------------------------------

def diffusion_step(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
                   data: LatentData, step: int) -> tuple[torch.Tensor, float]:
    """One optimizer step of stage 2 on a fresh batch: (L = mean‖ε − ε_θ(z_t, t, c)‖², or ‖v − v_θ‖² for a
    v-predicting schedule, learning rate)."""
    cfg, generator, device = run.cfg, run.generator, run.device
    per_rank = cfg.batch_size // run.world_size
    lr = learning_rate(step, cfg.steps, cfg.lr, cfg.warmup_steps)
    index = torch.randint(cfg.n_images, (per_rank,), generator=generator)
    noise_z = torch.randn(data.z_mean[index].shape, generator=generator)
    z0 = run.model_config.latent_scale * (data.z_mean[index] + data.z_std[index] * noise_z.to(device))  # scale · z
    t = torch.randint(schedule.n_train_steps, (per_rank,), generator=generator)
    eps = training_noise(z0.shape, cfg.offset_noise, generator).to(device)      # ε (+ offset · δ)
    z_t = schedule.q_sample(z0, t, eps)                                         # z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
    drop = torch.rand(per_rank, generator=generator) < cfg.caption_dropout      # caption → "" (CFG)
    ids = torch.where(drop[:, None], data.empty_ids, data.input_ids[index]).to(device)
    target = training_target(schedule, z0, t, eps)                              # ε, or v (prediction "v")
    loss = eps_loss(target, model(z_t, t.to(device), ids))                      # L = E‖ε − ε_θ(z_t, t, c)‖² (or v)
    parameters = list(run.text_encoder.parameters()) + list(run.unet.parameters())
    optimizer_step(optimizer, loss, parameters, lr, cfg.grad_clip)
    return loss, lr


def train_diffusion(run: Run, data: LatentData, first_step: int, stop_at: int | None) -> torch.optim.Optimizer | None:
    """Stage 2 from `first_step` to cfg.steps, with sample grids and checkpoints on the way; its optimizer when
    it ran to the end, None if it stopped at `stop_at` (counted over both stages)."""
    cfg = run.cfg
    schedule = training_schedule(run.model_config, cfg)
    run.text_encoder.train(), run.unet.train()
    model = wrap(TextToEps(run.text_encoder, run.unet), run.world_size, run.device)
    optimizer = torch.optim.AdamW(list(run.text_encoder.parameters()) + list(run.unet.parameters()), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    run.restore_optimizer(optimizer, "diffusion")
    if first_step == 0 and cfg.checkpoint_every:  # the end of stage 1: resuming from here skips it
        run.checkpoint_now("diffusion", 0, optimizer)
    bar = tqdm(range(first_step, cfg.steps), initial=first_step, total=cfg.steps, desc="stage 2: diffusion",
               disable=not (cfg.progress and run.is_main))
    for step in bar:
        loss, lr = diffusion_step(run, model, optimizer, schedule, data, step)
        run.history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if step % 100 == 0:
            run.say(f"step {step} loss {loss.item():.5f} lr {lr:.2e} ({time.time() - run.start:.0f} s)")
        done = step + 1
        if run.is_main and cfg.sample_every and done % cfg.sample_every == 0:
            sample_grid(run.text_encoder, run.unet, run.vae, run.tokenizer,
                        dataclasses.replace(cfg, model=run.model_config),
                        run.out_dir / "samples" / f"step_{done:06d}.png", schedule=schedule)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 or cfg.vae_steps + done == stop_at:
            run.checkpoint_now("diffusion", done, optimizer)
        if cfg.vae_steps + done == stop_at:
            bar.close()
            return None
    bar.close()
    return optimizer


# ------------------------------------------------------------------------------------------------------------------
# export, and the whole run
# ------------------------------------------------------------------------------------------------------------------

def export(run: Run, optimizer: torch.optim.Optimizer) -> None:
    """The last checkpoint, then (rank 0) `model.safetensors` in the official single-file layout."""
    cfg = run.cfg
    if cfg.checkpoint_every and cfg.steps % cfg.checkpoint_every:
        run.checkpoint_now("diffusion", cfg.steps, optimizer)
    run.history["seconds"] = time.time() - run.start
    if run.is_main:
        run.text_encoder.eval(), run.unet.eval()
        run.history["model"] = save_official(run.out_dir / "model.safetensors", run.text_encoder, run.unet, run.vae,
                                             run.model_config, overwrite=True)
        run.say(f"done in {run.history['seconds']:.0f} s: {run.history['model']}")
        run.log.close()
    if run.world_size > 1:
        dist.barrier()
    run.history["model_config"] = run.model_config


def train(cfg: TrainConfig, resume: bool = True, stop_at: int | None = None, new_stage2: bool = False,
          force: bool = False) -> dict:
    """Run (or resume) both stages; returns {"vae_loss": [...], "loss": [...], "model": Path or None, ...}.

    With resume=True and `out_dir/ckpt.safetensors` present, training continues from it with its TrainConfig:
    `cfg` may differ only where it does not change the training (run.SAFE_ON_RESUME: out_dir, progress, device,
    grids, checkpoint interval — applied and noted); other differences raise ValueError listing them.
    force: start afresh even if `out_dir` holds an earlier run's checkpoint or model (replacing them); without it
    that is a FileExistsError, raised before anything heavy runs.
    stop_at: checkpoint and return after this many optimizer steps in all (stage 1's, then stage 2's): a
    time-boxed run, resumed later by calling train again.
    new_stage2: when resuming a checkpoint whose stage 2 has not begun (a finished or time-boxed VAE), take stage
    2's recipe (STAGE2_FIELDS) from `cfg` instead of the checkpoint — one trained autoencoder, several stage 2s.
    """
    if cfg.init and not Path(cfg.init).is_file():
        raise FileNotFoundError(f"init {cfg.init!r}: no such model file; give the .safetensors to fine-tune from "
                                f"(e.g. ldm_scratch/bundled/tiny-shapes.safetensors)")
    cfg, checkpoint = open_checkpoint(cfg, resume, new_stage2, force)
    run = start_run(cfg, checkpoint)
    stage, step = run.restore() if checkpoint is not None else ("diffusion" if cfg.init else "vae", 0)
    if stage == "vae":
        vae_optimizer = torch.optim.AdamW(run.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        run.restore_optimizer(vae_optimizer, "vae")
        if train_autoencoder(run, vae_optimizer, step, stop_at):
            return run.history
        step = 0
    optimizer = train_diffusion(run, prepare_latents(run), step, stop_at)
    if optimizer is not None:
        export(run, optimizer)
    return run.history


if __name__ == "__main__":  # python -m ldm_scratch.train …, torchrun … -m ldm_scratch.train …: `ldm-scratch train …`
    sys.exit(main())
