"""A training run's live state, and the plumbing around the recipe: processes, run directory, log, checkpoints.

Processes: a no-op unless torchrun started us (it sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*); then each process
joins the group (gloo on CPU, nccl on CUDA), draws its own batches and DDP averages the gradients.

Checkpoints: `out_dir/ckpt.pt` holds the stage and step, both configs (JSON), the three networks, the current
stage's optimizer, every rank's generator state and the losses so far. Resuming puts all of it back, so a resumed
run continues exactly as the uninterrupted one would (on the same device and thread count). The recipe is the
checkpoint's, not the caller's: only where the run lives and whether it draws progress bars are the caller's.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist
import torch.nn as nn

from ..clip import CLIPTextModel
from ..configs import ModelConfig
from ..tokenizer import CLIPTokenizer
from ..unet import UNet
from ..vae import VAE
from .config import STAGE2_FIELDS, TrainConfig


# ------------------------------------------------------------------------------------------------------------------
# processes
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
# checkpoint files
# ------------------------------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, **state) -> None:
    """torch.save(state) to `path`, through a temporary file."""
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)  # an interrupted save never replaces a good checkpoint


def load_checkpoint(path: Path) -> dict:
    """What save_checkpoint wrote (on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file: it holds the config object


def open_checkpoint(cfg: TrainConfig, resume: bool, new_stage2: bool) -> tuple[TrainConfig, dict | None]:
    """(the run's recipe, the checkpoint to resume from or None). With resume and `out_dir/ckpt.pt` present the
    recipe is the checkpoint's, except out_dir and progress (so a moved run directory resumes in place) and, with
    new_stage2 while stage 2 has not begun, the STAGE2_FIELDS, which are `cfg`'s."""
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    checkpoint = load_checkpoint(ckpt_path) if resume and ckpt_path.is_file() else None
    if checkpoint is None:
        return cfg, None
    ours = cfg
    cfg = dataclasses.replace(TrainConfig.from_json(checkpoint["train_config"]), out_dir=cfg.out_dir,
                              progress=cfg.progress)
    if new_stage2:
        if checkpoint["stage"] != "vae":
            raise ValueError(f"{ckpt_path} is already in stage 2 (step {checkpoint['step']}): its recipe "
                             f"cannot change now; drop new_stage2 (--new-stage2) to resume it as it was")
        cfg = dataclasses.replace(cfg, **{name: getattr(ours, name) for name in STAGE2_FIELDS})
    return cfg, checkpoint


# ------------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Run:
    """One run's live state, shared by the stages of train.py: which process this is, where it writes, the
    networks, the data, the random generator (every batch, t, ε and dropout is drawn from it) and the losses."""
    cfg: TrainConfig
    checkpoint: dict | None             # what the run resumed from (None: a fresh start)
    rank: int
    world_size: int
    device: torch.device
    log: TextIO | None                  # out_dir/log.txt, written by rank 0 only
    text_encoder: CLIPTextModel
    unet: UNet
    vae: VAE
    tokenizer: CLIPTokenizer
    images: torch.Tensor                # uint8 [N, 3, H, W], the fixed training set
    captions: list[str]
    generator: torch.Generator          # seeded with seed·1000 + rank: each rank draws its own batches
    start: float                        # time.time() when the data was ready
    model_config: ModelConfig           # cfg.model, with the latent scale once stage 1 has chosen it
    history: dict                       # {"vae_loss": [...], "loss": [...], ...}: what train() returns

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "ckpt.pt"

    def say(self, message: str) -> None:
        """One line in log.txt (rank 0)."""
        if self.log is not None:
            print(message, file=self.log, flush=True)

    def restore(self) -> tuple[str, int]:
        """Put the checkpoint's networks, generator state, losses and model config back; (stage, step) to go on."""
        checkpoint = self.checkpoint
        if len(checkpoint["generators"]) != self.world_size:
            raise ValueError(f"{self.ckpt_path} was written by {len(checkpoint['generators'])} process(es) but this "
                             f"run has {self.world_size}: resume with the same number of processes (or pass "
                             f"--no-resume)")
        self.vae.load_state_dict(checkpoint["vae"])
        self.text_encoder.load_state_dict(checkpoint["text_encoder"])
        self.unet.load_state_dict(checkpoint["unet"])
        self.generator.set_state(checkpoint["generators"][self.rank])
        self.history["vae_loss"], self.history["loss"] = checkpoint["vae_loss"], checkpoint["loss"]
        self.model_config = ModelConfig.from_json(checkpoint["model_config"])
        return checkpoint["stage"], checkpoint["step"]

    def restore_optimizer(self, optimizer: torch.optim.Optimizer, stage: str) -> None:
        """The checkpoint's optimizer state into `optimizer`, if the checkpoint was written during `stage`."""
        if self.checkpoint is not None and self.checkpoint["stage"] == stage:
            optimizer.load_state_dict(self.checkpoint["optimizer"])

    def checkpoint_now(self, stage: str, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Write ckpt.pt: `step` optimizer steps of `stage` are done. Every rank must call it (it gathers states)."""
        generators = [self.generator.get_state()]
        if self.world_size > 1:  # rank 0 writes every rank's generator, so a resumed DDP run draws the same batches
            generators = [None] * self.world_size
            dist.all_gather_object(generators, self.generator.get_state())
        if self.is_main:
            save_checkpoint(self.ckpt_path, stage=stage, step=step, train_config=self.cfg.to_json(),
                            model_config=self.model_config.to_json(), vae=self.vae.state_dict(),
                            text_encoder=self.text_encoder.state_dict(), unet=self.unet.state_dict(),
                            optimizer=optimizer.state_dict(), generators=generators,
                            vae_loss=self.history["vae_loss"], loss=self.history["loss"])
