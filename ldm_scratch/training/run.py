"""A training run's live state, and the plumbing around the recipe: processes, run directory, log, checkpoints.

Processes: a no-op unless torchrun started us (it sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*); then each process
joins the group (gloo on CPU, nccl on CUDA), draws its own batches and DDP averages the gradients.

Checkpoints: `out_dir/ckpt.safetensors` holds the stage and step, both configs, the three networks, the current
stage's optimizer, every rank's generator state and the losses so far — tensors plus a JSON record, no pickle
(state.py), written atomically. Resuming puts all of it back, so a resumed run continues exactly as the
uninterrupted one would (on the same device and thread count). The recipe is the checkpoint's: the caller may
change only what does not alter the training (SAFE_ON_RESUME: where the run lives, progress bars, device, grids,
checkpoint interval); any other difference is refused with the list. Work is never replaced silently: a fresh
start in a folder that holds a run needs `force`.
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
from ..checkpoint import CheckpointError
from .config import STAGE2_FIELDS, TrainConfig
from .state import load_state, read_train_config_json, refuse_pickle, save_state


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
# checkpoint files, and what a run directory may be used for
# ------------------------------------------------------------------------------------------------------------------

CKPT_NAME = "ckpt.safetensors"
OLD_CKPT_NAME = "ckpt.pt"           # older versions' pickle: refused, never opened
# fields that change neither the recipe nor the data drawn: taken from the caller on resume, with a note (a new
# device may change the last bits of the numbers, as another machine would)
SAFE_ON_RESUME = ("out_dir", "progress", "device", "sample_every", "checkpoint_every", "sample_steps",
                  "guidance_scale")


def save_checkpoint(path: Path, **state) -> None:
    """The resume state (stage, step, configs, networks, optimizer, generators, losses) as safetensors + JSON,
    written atomically (state.py): an interrupted save leaves the previous checkpoint intact."""
    save_state(Path(path), state)


def load_checkpoint(path: Path) -> dict:
    """What save_checkpoint wrote (tensors on the CPU). Never unpickles: a `.pt` file is refused (CheckpointError)."""
    return load_state(Path(path))


def refuse_overwrite(out_dir: Path, resume: bool) -> None:
    """A fresh start must not silently replace an earlier run's checkpoint or model (FileExistsError)."""
    found = [name for name in (CKPT_NAME, OLD_CKPT_NAME, "model.safetensors") if (out_dir / name).is_file()]
    if not found:
        return
    why = "--no-resume would start afresh over it" if not resume else "it has no checkpoint to resume from, so " \
        "training would start afresh over it"
    raise FileExistsError(f"--out {out_dir} already holds a run ({', '.join(found)}): {why}. Resume it (drop "
                          f"--no-resume), choose another --out, or pass --force (train(..., force=True)) to "
                          f"replace it")


def compare_configs(stored: TrainConfig, given: TrainConfig, stage: str, new_stage2: bool,
                    where: Path) -> tuple[TrainConfig, list[str]]:
    """(the recipe to resume with, notes on what was taken from `given`). Fields in SAFE_ON_RESUME are taken from
    `given`; STAGE2_FIELDS too with new_stage2 while stage 2 has not begun; any other difference is a ValueError
    listing every differing field (stored → given), before anything heavy runs."""
    changed = {f.name: (getattr(stored, f.name), getattr(given, f.name)) for f in dataclasses.fields(TrainConfig)
               if getattr(stored, f.name) != getattr(given, f.name)}
    if new_stage2 and stage != "vae":
        raise ValueError(f"{where} is already in stage 2: its recipe cannot change now; drop new_stage2 "
                         f"(--new-stage2) to resume it as it was")
    applicable = set(SAFE_ON_RESUME) | (set(STAGE2_FIELDS) if new_stage2 else set())
    refused = {name: change for name, change in changed.items() if name not in applicable}
    if refused:
        listed = "; ".join(f"{name}: {a!r} (checkpoint) vs {b!r} (given)" for name, (a, b) in refused.items())
        hint = (" Stage 2 has not begun: --new-stage2 (new_stage2=True) takes the stage-2 fields "
                f"({', '.join(STAGE2_FIELDS)}) from this command." if stage == "vae" and not new_stage2
                and set(refused) & set(STAGE2_FIELDS) else "")
        raise ValueError(f"{where} was started with another recipe: {listed}. Resuming keeps a run's recipe: pass "
                         f"the same values (or leave those flags out), or start a new run with another --out "
                         f"(or --no-resume --force to replace this one).{hint}")
    same_place = Path(stored.out_dir).resolve() == Path(given.out_dir).resolve()
    quiet = {"progress"} | ({"out_dir"} if same_place else set())  # not worth a note
    applied = {name: change for name, change in changed.items() if name in applicable and name not in quiet}
    notes = [f"resuming {where}: taking {name} = {b!r} from this command (checkpoint: {a!r}), safe to change on "
             f"resume" for name, (a, b) in applied.items()]
    return dataclasses.replace(stored, **{name: getattr(given, name) for name in changed if name in applicable}), \
        notes


def stored_train_config(out_dir: str | Path) -> TrainConfig | None:
    """The TrainConfig of the run in `out_dir` (read from its checkpoint's header only), or None if it has none."""
    path = Path(out_dir) / CKPT_NAME
    return parse_train_config(read_train_config_json(path), path) if path.is_file() else None


def parse_train_config(text: str, path: Path) -> TrainConfig:
    """TrainConfig.from_json, a failure named as a damaged checkpoint (CheckpointError)."""
    try:
        return TrainConfig.from_json(text)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{path}: its TrainConfig is unreadable ({type(error).__name__}: {error}); the file "
                              f"is damaged or from another version — start afresh with --no-resume --force") from None


def open_checkpoint(cfg: TrainConfig, resume: bool, new_stage2: bool,
                    force: bool = False) -> tuple[TrainConfig, dict | None]:
    """(the run's recipe, the checkpoint to resume from or None), before anything heavy runs.

    Fresh start (resume=False, or no checkpoint): refused if `out_dir` holds an earlier run, unless `force`.
    Resume with `out_dir/ckpt.safetensors` present: the recipe is the checkpoint's; `cfg` may differ from it only in
    SAFE_ON_RESUME fields (and, with new_stage2 while stage 2 has not begun, STAGE2_FIELDS), which are applied and
    noted in checkpoint["notes"]; any other difference is refused with the list. An old pickled `ckpt.pt` is refused.
    """
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CKPT_NAME
    if resume and ckpt_path.is_file():
        checkpoint = load_checkpoint(ckpt_path)
    elif resume and (out_dir / OLD_CKPT_NAME).is_file():
        raise refuse_pickle(out_dir / OLD_CKPT_NAME)
    else:
        if not force:
            refuse_overwrite(out_dir, resume)
        return cfg, None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; setup_distributed joins the group later
    if len(checkpoint["generators"]) != world_size:
        raise ValueError(f"{ckpt_path} was written by {len(checkpoint['generators'])} process(es) but this run has "
                         f"{world_size}: resume with the same number of processes (torchrun --nproc_per_node)")
    stored = parse_train_config(checkpoint["train_config"], ckpt_path)
    cfg, checkpoint["notes"] = compare_configs(stored, cfg, checkpoint["stage"], new_stage2, ckpt_path)
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
        return self.out_dir / CKPT_NAME

    def say(self, message: str) -> None:
        """One line in log.txt (rank 0)."""
        if self.log is not None:
            print(message, file=self.log, flush=True)

    def restore(self) -> tuple[str, int]:
        """Put the checkpoint's networks, generator state, losses and model config back; (stage, step) to go on."""
        checkpoint = self.checkpoint  # open_checkpoint has checked it: same number of processes, same recipe
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
        """Write the checkpoint: `step` optimizer steps of `stage` are done. Every rank must call it (it gathers
        states)."""
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
