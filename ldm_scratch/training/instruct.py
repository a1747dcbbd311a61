"""Training a tiny InstructPix2Pix from the bundled tiny model: `python scripts/train_instruct.py --out FILE`.

The recipe of Brooks et al. (2023, §3.2), at the tiny model's size, on the data generator's own edit pairs
(instruct_data.py: "make the circle green", "turn it into a square", "change the background to white"):

- start from the text-to-image model; widen the UNet's first convolution from 4 to 8 input channels, the 4 new
  ones (the image to edit) with ZERO weights, so step 0 is exactly the old model whatever the image (`widen_input`);
- the extra channels take c_I = E(source).mode, the VAE posterior's mode WITHOUT the latent scale — the convention
  of the paper's code and of ldm_scratch/instruct.py's `image_latents`, which sampling uses;
- conditioning dropout, the paper's scheme with p = 0.05 (`drop_conditions`): one uniform r per example, the text
  replaced by "" when r < 2p, the image by zeros when p ≤ r < 3p — 5 % text only, 5 % image only, 5 % both — so the
  network also learns ε(c_I, ∅) and ε(∅, ∅), the two other terms of the three-way guidance (instruct.py, eq 3);
- the loss is the tiny model's own (train.py stage 2): z_0 = latent_scale · z, z ~ q(z|target),
  z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε with ε plus offset noise, L = E‖ε − ε_θ(cat[z_t, c_I], t, CLIP(instruction))‖²;
- the text encoder trains with the UNet, as it did in stage 2 (it has never seen "make", "turn" or "change");
  the VAE is frozen. AdamW, warm-up then cosine decay (train.learning_rate), gradients clipped to 1.

Budget: `steps`, and a wall-clock cap `minutes` that stops the run early (it still saves). Data-parallel with
`torchrun --nproc_per_node 2 scripts/train_instruct.py …` (gloo on CPU): each rank draws its own batches, the
global batch stays `batch_size`, and the ranks agree every `log_every` steps on whether the cap is reached.

Measured (scripts/eval_instruct.py, docs/instruct_eval.json): 3,230 steps of batch 32 in 16 minutes follow the
instruction (98 % of held-out edits right) but do not keep the rest of the image (18 % keep both untouched
attributes): the image channels' weights stayed ~35× smaller than the noise channels' — the goal (≥ 90 %) is missed.

Output: the model as one official-layout single file (8-channel UNet, its ModelConfig in the metadata) that
`ldm_scratch.load_pipeline(path)` loads and `pipe.instruct` runs, written atomically, never over an existing file
without `force`; beside it `<name>.history.json` (losses, steps, time).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import load_models, save_official
from ..configs import ModelConfig
from ..diffusion import eps_loss
from ..files import write_atomically
from ..pipeline import BUNDLED_MODEL
from ..tokenizer import load_tokenizer
from ..train import learning_rate, optimizer_step, training_noise, training_target
from ..unet import UNet
from .dataset import to_model_range
from .instruct_data import edit_pairs
from .run import setup_distributed, wrap


@dataclass
class InstructTrainConfig:
    out: str = "runs/instruct/tiny-shapes-instruct.safetensors"
    base_model: str = str(BUNDLED_MODEL)
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    n_pairs: int = 8000             # the fixed training set of edit pairs, rendered once
    dropout: float = 0.05           # p of the paper's conditioning dropout (drop_conditions)
    offset_noise: float = 0.1       # as the tiny model was trained (train.training_noise)
    train_text_encoder: bool = True
    seed: int = 0
    minutes: float = 20.0           # wall-clock cap: the run stops early (and saves) when it is reached
    log_every: int = 50

    def __post_init__(self):
        if not str(self.out).endswith(".safetensors"):
            raise ValueError(f"out={self.out!r}: the model is written as a .safetensors file; give a name ending "
                             "in .safetensors")
        for name in ("steps", "batch_size", "n_pairs", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number ≥ 1, got {getattr(self, name)!r}")
        if not 0 <= self.dropout <= 1 / 3:
            raise ValueError(f"dropout must be in [0, 1/3] (3·p of the examples lose a condition), got "
                             f"{self.dropout!r}")
        if not self.lr > 0 or not self.minutes > 0:
            raise ValueError(f"lr and minutes must be > 0, got lr={self.lr!r}, minutes={self.minutes!r}")


# ------------------------------------------------------------------------------------------------------------------
# the pieces
# ------------------------------------------------------------------------------------------------------------------

def instruct_config(config: ModelConfig) -> ModelConfig:
    """The base model's config with a 2·z-channel UNet input (latents + image latents) and its own name."""
    unet = dataclasses.replace(config.unet, in_channels=2 * config.latent_channels)
    return dataclasses.replace(config, unet=unet, name=f"{config.name}-instruct")


@torch.no_grad()
def widen_input(unet: UNet, in_channels: int) -> UNet:
    """A copy of `unet` whose first convolution takes `in_channels` inputs: the old weights for the first
    C_old channels, zeros for the new ones (Brooks et al. §3.2), so

        UNet_wide(cat[z_t, c_I], t, c) = UNet(z_t, t, c)   for every c_I, as long as the new weights are 0.

    input_conv.weight [C_out, C_old, 3, 3] → [C_out, in_channels, 3, 3]; every other tensor is copied as is."""
    old = unet.config.in_channels
    if unet.config.in_channels != unet.config.out_channels:
        raise ValueError(f"the UNet to widen must be a text-to-image UNet ({unet.config.out_channels} input "
                         f"channels), it takes {old}: it is already an instruct or inpainting model")
    if in_channels <= old:
        raise ValueError(f"in_channels={in_channels} does not widen a UNet of {old} input channels")
    wide = UNet(dataclasses.replace(unet.config, in_channels=in_channels))
    state = unet.state_dict()
    weight = state["input_conv.weight"]
    extra = weight.new_zeros(weight.shape[0], in_channels - old, *weight.shape[2:])
    state["input_conv.weight"] = torch.cat([weight, extra], dim=1)        # [C_out, C_old + new, 3, 3], new = 0
    wide.load_state_dict(state)
    return wide.to(weight.dtype).train(unet.training)


def drop_conditions(batch: int, p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_text [B], drop_image [B]) bool, the paper's scheme (instruct-pix2pix ddpm_edit.py): one r ~ U(0, 1)
    per example; text → "" when r < 2p, image → 0 when p ≤ r < 3p. So p of the examples lose only the text, p
    only the image, p both (r ∈ [p, 2p))."""
    r = torch.rand(batch, generator=generator)
    return r < 2 * p, (r >= p) & (r < 3 * p)


class InstructEps(nn.Module):
    """ε_θ(z_t, t, c_I, c_T(ids)) → [B, 4, h, w]: the text encoder and the 8-channel UNet as one module (DDP)."""

    def __init__(self, text_encoder: nn.Module, unet: UNet):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, c_image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([z_t, c_image], dim=1), t, self.text_encoder(ids))   # [B, 8, h, w] in


@dataclass
class EditData:
    """The training set, prepared once: c_I of each source, the target's posterior N(μ, σ²), the instruction ids."""
    c_image: torch.Tensor           # [N, 4, h, w]  E(source).mode, no latent scale
    z_mean: torch.Tensor            # [N, 4, h, w]  μ of q(z | target)
    z_std: torch.Tensor             # [N, 4, h, w]  σ
    ids: torch.Tensor               # [N, 77]
    empty_ids: torch.Tensor         # [77]: ∅ = CLIP("")


@torch.no_grad()
def prepare_edits(vae: nn.Module, tokenizer, sources: torch.Tensor, targets: torch.Tensor,
                  instructions: list[str]) -> EditData:
    """Encode every pair once (uint8 [N, 3, H, W] each) and tokenise each distinct instruction once."""
    c_image, z_mean, z_std = [], [], []
    for source, target in zip(sources.split(256), targets.split(256)):
        c_image.append(vae.encode(to_model_range(source)).mode())
        posterior = vae.encode(to_model_range(target))
        z_mean.append(posterior.mean), z_std.append(posterior.std)
    unique = sorted(set(instructions))
    ids = dict(zip(unique, tokenizer(unique)))
    return EditData(torch.cat(c_image), torch.cat(z_mean), torch.cat(z_std),
                    torch.stack([ids[text] for text in instructions]), tokenizer([""])[0])


def instruct_loss(model: nn.Module, data: EditData, schedule, latent_scale: float, index: torch.Tensor,
                  cfg: InstructTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """L = mean‖ε − ε_θ(cat[z_t, c_I], t, c_T)‖² on the pairs `index` [B], conditions dropped as the paper does."""
    z0 = latent_scale * (data.z_mean[index] + data.z_std[index] * torch.randn(data.z_mean[index].shape,
                                                                             generator=generator))
    t = torch.randint(schedule.n_train_steps, (len(index),), generator=generator)
    eps = training_noise(z0.shape, cfg.offset_noise, generator)                 # ε (+ offset · δ)
    z_t = schedule.q_sample(z0, t, eps)                                         # √ᾱ_t z_0 + √(1−ᾱ_t) ε
    drop_text, drop_image = drop_conditions(len(index), cfg.dropout, generator)
    ids = torch.where(drop_text[:, None], data.empty_ids, data.ids[index])      # c_T → ∅ = CLIP("")
    c_image = data.c_image[index] * (~drop_image)[:, None, None, None]          # c_I → 0
    target = training_target(schedule, z0, t, eps)                              # ε (v for a v-model)
    return eps_loss(target, model(z_t, t, c_image, ids))                        # L = E‖ε − ε_θ(·)‖²


# ------------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------------

def check_output(cfg: InstructTrainConfig, force: bool) -> Path:
    """The model path, refused before anything heavy runs when it exists and force is not given."""
    out = Path(cfg.out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; give the path of the .safetensors file to write")
    return out


def load_base(cfg: InstructTrainConfig, tokenizer=None):
    """(text encoder, widened UNet, VAE, instruct ModelConfig, tokenizer, schedule) from the base model file.
    tokenizer: a tokenizer, a path for load_tokenizer, or None (the vocabulary load_tokenizer finds)."""
    if not Path(cfg.base_model).is_file():
        raise FileNotFoundError(f"base model {cfg.base_model!r}: no such file; give a text-to-image .safetensors "
                                f"(default: the bundled {BUNDLED_MODEL.name})")
    loaded = load_models(cfg.base_model, dtype=torch.float32)
    if loaded.config.unet.in_channels != loaded.config.latent_channels:
        raise ValueError(f"base model {cfg.base_model} has a {loaded.config.unet.in_channels}-channel UNet input; "
                         f"start from a text-to-image model ({loaded.config.latent_channels} channels)")
    unet = widen_input(loaded.unet, 2 * loaded.config.latent_channels)
    if tokenizer is None or isinstance(tokenizer, (str, Path, tuple, list)):    # a path for load_tokenizer
        tokenizer = load_tokenizer(tokenizer if tokenizer is not None else loaded.tokenizer_path)
    config = instruct_config(loaded.config)
    return loaded.text_encoder, unet, loaded.vae, config, tokenizer, config.schedule()


def train_instruct(cfg: InstructTrainConfig, *, force: bool = False, tokenizer=None, say=print) -> dict:
    """Run the recipe (module docstring); returns the history (also written beside the model)."""
    out = check_output(cfg, force)
    rank, world_size, device = setup_distributed("cpu")
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must divide by the number of processes ({world_size})")
    say = say if rank == 0 else (lambda *_: None)
    start = time.time()
    torch.manual_seed(cfg.seed)
    text_encoder, unet, vae, config, tokenizer, schedule = load_base(cfg, tokenizer)
    vae.eval().requires_grad_(False)
    text_encoder.train().requires_grad_(cfg.train_text_encoder)
    unet.train()
    sources, targets, edits = edit_pairs("train", cfg.n_pairs, config.image_size, cfg.seed)
    data = prepare_edits(vae, tokenizer, sources, targets, [e.instruction for e in edits])
    say(f"data ready: {cfg.n_pairs} edit pairs rendered and encoded ({time.time() - start:.0f} s)")

    model = wrap(InstructEps(text_encoder, unet), world_size, device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    history = {"config": asdict(cfg), "loss": [], "world_size": world_size}
    step, train_start = 0, time.time()
    for step in range(1, cfg.steps + 1):
        index = torch.randint(cfg.n_pairs, (cfg.batch_size // world_size,), generator=generator)
        loss = instruct_loss(model, data, schedule, config.latent_scale, index, cfg, generator)
        optimizer_step(optimizer, loss, parameters, learning_rate(step - 1, cfg.steps, cfg.lr, cfg.warmup_steps),
                       grad_clip=1.0)
        history["loss"].append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            recent = history["loss"][-cfg.log_every:]
            say(f"step {step} loss {sum(recent) / len(recent):.4f} ({time.time() - start:.0f} s, "
                f"{(step / (time.time() - train_start)):.2f} steps/s)")
            if _out_of_time(start, cfg.minutes, world_size):
                say(f"stopping at step {step}: the {cfg.minutes}-minute cap is reached")
                break
    history.update(steps_done=step, seconds=time.time() - start, train_seconds=time.time() - train_start)
    if rank == 0:
        text_encoder.eval(), unet.eval()
        out.parent.mkdir(parents=True, exist_ok=True)
        save_official(out, text_encoder, unet, vae, config, overwrite=True)    # atomic (files.replacing)
        write_atomically(history_path(out), json.dumps(history).encode())
        say(f"saved {out} after {step} steps in {history['seconds']:.0f} s")
    if world_size > 1:
        dist.barrier()
    return history


def history_path(out: Path) -> Path:
    """tiny-shapes-instruct.safetensors → tiny-shapes-instruct.history.json"""
    return out.with_name(out.name.removesuffix(".safetensors") + ".history.json")


def _out_of_time(start: float, minutes: float, world_size: int) -> bool:
    """True when the wall-clock cap is reached; under DDP the ranks agree (any rank over → all stop together)."""
    over = torch.tensor(float(time.time() - start > 60 * minutes))
    if world_size > 1:
        dist.all_reduce(over, op=dist.ReduceOp.MAX)
    return bool(over.item())
