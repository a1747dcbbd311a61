"""Fine-tuning a trained model on a few pictures: LoRA, textual inversion, DreamBooth (`ldm-scratch finetune`).

All three minimise the denoising loss of stage 2 of train.py on the new pictures, x → z₀ = scale · E(x):

    L = E_{z₀, c, t, ε} ‖ ε − ε_θ(z_t, t, c) ‖²,      z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε          (DDPM eq 4.3)

and differ only in which numbers θ may move:

    lora               a low-rank update (α/r)·B A beside chosen frozen layers (lora_training.py)   → LoRA file
    textual-inversion  the new word's rows of the token table, v* (Gal et al. 2022, eq 2); every
                       other row is frozen by zeroing its gradient                              → embedding file
    dreambooth         the whole UNet (+ the text encoder with --train-text-encoder) (Ruiz et al.) → full model
                       or only its prompt K, V projections, --unet-params cross-kv (Custom Diffusion)

--token WORD --init-word W --num-vectors n with dreambooth or lora trains a new word's n rows of the token table
with the model ("pivotal tuning"; the advanced DreamBooth-LoRA recipes do the same): a prompt word the vocabulary
lacks, so no old prompt reads it, with its own start point (not the base model's reading of an existing word) and
room for several vectors. A model file or a LoRA has no place for new rows: they go beside it as an embedding file,
OUT/<token>.safetensors (textual inversion's format), loaded with pipe.load_textual_inversion.

--train-words WORDS (dreambooth) also trains the token-table rows of those words and nothing else of the text
encoder (Kumari et al. 2023 train the new word's row with the K, V; "pivotal tuning" pairs the same with a UNet
update). Every prompt without those words then encodes bit-identically to the base model, c = τ(y) unchanged, so
an old prompt can change only through the UNet — and prior preservation is what guards the UNet.

DreamBooth's prior preservation keeps the class the new pictures belong to from collapsing onto them: with
--class-prompt, the model's own pictures of the class (generated before training, finetune_data.class_images)
are trained on alongside, each batch holding both halves:

    L = ‖ε − ε̂(x_t, c_inst)‖² + λ ‖ε′ − ε̂(x_t^pr, c_class)‖²                     (Ruiz et al. 2023, eq 2; λ = --prior-weight)

--prior-target model replaces the drawn noise ε′ of the class half by what the model said before fine-tuning,
ε_θ₀(x_t^pr, t, c_class) (a frozen copy): the same minimiser as ε′ where the base model is the best denoiser of
its own pictures (E[ε′ | x_t^pr] = ε_θ₀), but without ε′'s variance, so each step measures the drift itself
(distillation, as in "learning without forgetting", Li & Hoiem 2016).

--prior-uncond p gives a fraction p of the class items the empty prompt ∅: the unconditional ε̂(x_t, ∅) that
classifier-free guidance subtracts, ε̃ = ε̂_∅ + w(ε̂_c − ε̂_∅), is never trained by a fine-tune otherwise, and a
drift δ of ε̂_∅ moves every prompt's guided ε̃ by −(w − 1)δ (−6.5δ at w = 7.5).

The same term works for LoRA (same code path: only θ differs): a LoRA trained on twenty pictures of one thing
otherwise learns "draw that thing" for every prompt (scripts/finetune_demo.py: 50.7 points of the old vocabulary
lost without the prior, docs/finetune_demo_run1.json; 26.0 with it, run3.json).
Textual inversion needs none: it moves only the new word's rows, which no other prompt reads.

Custom Diffusion (Kumari et al. 2023, §3.1) moves only W_k, W_v of the attentions that read the prompt,
K = W_k c and V = W_v c: the rest of the UNet turns whatever the text makes of the latent into pixels, and is
kept as it is (--unet-params cross-kv; for LoRA, --lora-targets cross-kv).

The run lives in --out: `ckpt.safetensors` (the trainable tensors, AdamW's state, every rank's generator, the
losses and this FinetuneConfig — state.py's format, no pickle), the class images, and at the end the output
file. Resuming continues exactly where the checkpoint stopped; a different recipe is refused with the list.
Under torchrun each process draws its own batches (seeded seed·1000 + rank) and DDP averages the gradients, as
in train.py.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..diffusion import eps_loss
from ..files import replacing
from .dataset import to_model_range
from .finetune_data import class_images, image_files, load_folder, read_captions
from .finetune_params import prepare_method
from .lora_training import TARGET_PRESETS
from .run import CKPT_NAME, setup_distributed, wrap
from .state import load_state, save_state

METHODS = ("lora", "textual-inversion", "dreambooth")
DEFAULT_LR = {"lora": 1e-3, "textual-inversion": 5e-3, "dreambooth": 1e-4}
PRIOR_TARGETS = ("noise", "model")  # --prior-target: the drawn ε′, or the base model's prediction ε_θ₀
UNET_PARAMS = ("all", "cross-kv")   # --unet-params of dreambooth: every UNet weight, or the prompt's K, V only
LORA_FORMATS = ("kohya", "diffusers")
UNSAFE_IN_NAMES = '<>:"/\\|?*'      # characters a file name cannot hold on some systems
SAFE_ON_RESUME = ("out_dir", "progress", "device", "checkpoint_every", "force")


@dataclass
class FinetuneConfig:
    """Everything that decides a fine-tune (one flag each, `finetune_command.py`)."""
    method: str
    data: str
    out_dir: str
    checkpoint: str = ""               # the model to adapt ("": the bundled tiny model)
    tokenizer: str = ""                # its vocabulary, as load_tokenizer takes it ("": found as usual)
    instance_prompt: str = ""          # the caption of every image without a .txt
    steps: int = 200
    lr: float = 0.0                    # 0: DEFAULT_LR[method]
    batch: int = 4
    seed: int = 0
    # lora
    lora_rank: int = 4
    lora_alpha: float = 0.0            # 0: α = r (factor α/r = 1)
    lora_targets: str = "attention"    # a TARGET_PRESETS name (UNet layers)
    lora_text_encoder: bool = False    # also the text encoder's attention and MLP
    lora_format: str = "kohya"
    # textual inversion
    token: str = ""
    init_word: str = ""
    num_vectors: int = 1
    # dreambooth
    train_text_encoder: bool = False
    unet_params: str = "all"           # an UNET_PARAMS name: which UNet weights train
    train_words: str = ""              # words (comma-separated) whose token rows train, the text encoder else frozen
    word_lr: float = 0.0               # their learning rate (0: DEFAULT_LR["textual-inversion"])
    # prior preservation (dreambooth and lora)
    class_prompt: str = ""
    num_class_images: int = 50
    prior_weight: float = 1.0
    prior_target: str = "noise"        # a PRIOR_TARGETS name: ε′ (Ruiz et al.) or the base model's ε̂ (distillation)
    prior_uncond: float = 0.0          # fraction of class items trained with the empty prompt instead
    class_dir: str = ""                # "": OUT/class_images
    # bookkeeping
    checkpoint_every: int = 100
    device: str = "cpu"
    progress: bool = True
    force: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.lora_format not in LORA_FORMATS:
            raise ValueError(f"--lora-format {self.lora_format!r}: choose one of {', '.join(LORA_FORMATS)}")
        if self.lora_targets not in TARGET_PRESETS:
            raise ValueError(f"--lora-targets {self.lora_targets!r}: choose one of {', '.join(TARGET_PRESETS)}")
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"--steps {self.steps} and --batch {self.batch} must both be at least 1")
        if self.lora_rank < 1 or self.num_vectors < 1:
            raise ValueError(f"--lora-rank {self.lora_rank} and --num-vectors {self.num_vectors}: the rank must be "
                             f"at least 1, and so must the number of vectors")
        if self.method == "textual-inversion" and not (self.token and self.init_word):
            raise ValueError("textual inversion needs --token (the new word, e.g. '<cross>') and --init-word (a "
                             "word it starts from, e.g. 'square')")
        if self.token and not self.init_word:
            raise ValueError(f"--token {self.token!r} needs --init-word, the word its vectors start from")
        if self.token and self.train_words:
            raise ValueError("--token (a new word's rows) and --train-words (existing words' rows): give one of the two")
        if self.token and self.train_text_encoder:
            raise ValueError("--token trains only the new word's rows, --train-text-encoder all of the text encoder: "
                             "give one of the two")
        if self.unet_params not in UNET_PARAMS:
            raise ValueError(f"--unet-params {self.unet_params!r}: choose one of {', '.join(UNET_PARAMS)}")
        if self.unet_params != "all" and self.method != "dreambooth":
            raise ValueError(f"--unet-params {self.unet_params} is for --method dreambooth (for LoRA: "
                             f"--lora-targets {self.unet_params})")
        if self.train_words and self.method != "dreambooth":
            raise ValueError("--train-words is for --method dreambooth, whose output file (a whole model) carries "
                             "the changed rows; a LoRA or embedding file has no place for rows of existing words")
        if self.train_words and self.train_text_encoder:
            raise ValueError("--train-words trains only those words' rows of the text encoder, --train-text-encoder "
                             "all of it: give one of the two")
        if self.prior_target not in PRIOR_TARGETS:
            raise ValueError(f"--prior-target {self.prior_target!r}: choose one of {', '.join(PRIOR_TARGETS)}")
        if not 0.0 <= self.prior_uncond <= 1.0:
            raise ValueError(f"--prior-uncond {self.prior_uncond}: a fraction, from 0 to 1")
        if self.class_prompt and self.method == "textual-inversion":
            raise ValueError("--class-prompt (prior preservation) is for --method dreambooth or lora: textual "
                             "inversion moves only the new word's rows, which no class prompt reads")

    @property
    def learning_rate(self) -> float:
        return self.lr or DEFAULT_LR[self.method]

    @property
    def words(self) -> list[str]:
        return [w.strip() for w in self.train_words.split(",") if w.strip()]

    @property
    def embedding_output(self) -> Path | None:
        """The new word's embedding file (--token), the output itself for textual inversion; None without --token."""
        if not self.token:
            return None
        return Path(self.out_dir) / f"{''.join(c for c in self.token if c not in UNSAFE_IN_NAMES)}.safetensors"

    @property
    def output(self) -> Path:
        """The file the run writes at the end, in --out."""
        if self.method == "lora":
            return Path(self.out_dir) / ("lora.safetensors" if self.lora_format == "kohya"
                                         else "pytorch_lora_weights.safetensors")
        if self.method == "textual-inversion":  # the web UI names the word after the file: keep them the same
            return self.embedding_output
        return Path(self.out_dir) / "model.safetensors"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def open_run(cfg: FinetuneConfig, resume: bool) -> dict | None:
    """The checkpoint to resume from (None: a fresh start), after refusing to replace work without --force and a
    resumed run whose recipe differs."""
    out = Path(cfg.out_dir)
    ckpt = out / CKPT_NAME
    if cfg.output.exists() and not cfg.force:
        raise FileExistsError(f"{cfg.output} exists (a finished fine-tune): choose another --out, or pass --force "
                              f"to train again and replace it")
    finished = cfg.output.exists()            # with --force: train again from the start
    if finished or not (resume and ckpt.is_file()):
        if ckpt.is_file() and not cfg.force and not finished:
            raise FileExistsError(f"--out {out} holds a fine-tune's checkpoint: resume it (drop --no-resume), "
                                  f"choose another --out, or pass --force to start afresh over it")
        return None
    state = load_state(ckpt)
    stored = json.loads(state["train_config"])
    given = json.loads(cfg.to_json())
    differ = {k: (stored.get(k), v) for k, v in given.items() if stored.get(k) != v and k not in SAFE_ON_RESUME}
    if differ:
        listed = "; ".join(f"{k}: {a!r} (checkpoint) vs {b!r} (given)" for k, (a, b) in differ.items())
        raise ValueError(f"{ckpt} was started with another recipe: {listed}. Pass the same values to resume it, "
                         f"or choose another --out (or --no-resume --force to start afresh)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if len(state["generators"]) != world_size:
        raise ValueError(f"{ckpt} was written by {len(state['generators'])} process(es), this run has "
                         f"{world_size}: resume with the same torchrun --nproc_per_node")
    return state


class Denoiser(nn.Module):
    """ε_θ(z_t, t, c(ids)) with the fine-tune's trainable parts as submodules, so that DDP finds them."""

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, extra: nn.Module | None = None):
        super().__init__()
        self.text_encoder, self.unet, self.extra = text_encoder, unet, extra

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(z_t, t, self.text_encoder(input_ids))   # [B, 4, h, w]


@torch.no_grad()
def encode(pipe, images: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior q(z|x) = N(μ, σ²) of each image, (μ, σ) [N, 4, h, w], computed once."""
    moments = [pipe.vae.encode(to_model_range(batch).to(device)) for batch in images.split(32)]
    return torch.cat([m.mean for m in moments]), torch.cat([m.std for m in moments])


def draw_batch(data: dict, n: int, scale: float, schedule, generator: torch.Generator, device):
    """(z_t, t, ids, target) for n items of `data`: z₀ = scale·(μ + σ·n), t ~ U{0..T−1}, ε ~ N(0, I)."""
    from ..train import training_target
    index = torch.randint(len(data["ids"]), (n,), generator=generator)
    z0 = scale * (data["mean"][index] + data["std"][index] * torch.randn(data["mean"][index].shape,
                                                                         generator=generator).to(device))
    t = torch.randint(schedule.n_train_steps, (n,), generator=generator)
    eps = torch.randn(z0.shape, generator=generator).to(device)
    z_t = schedule.q_sample(z0, t, eps)                                  # z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε
    return z_t, t.to(device), data["ids"][index].to(device), training_target(schedule, z0, t, eps)


def finetune(cfg: FinetuneConfig, resume: bool = True, stop_at: int | None = None) -> dict:
    """Run (or resume) a fine-tune; returns {"loss": [...], "prior_loss": [...], "output": Path or None, ...}.
    stop_at: checkpoint and return after this many steps in all (a time-boxed run, resumed by calling again)."""
    from ..loader import load_pipeline
    captions = read_captions(image_files(Path(cfg.data)), cfg.instance_prompt or None)  # refused before work
    if cfg.token and not any(cfg.token.lower() in c.lower() for c in captions):
        raise ValueError(f"no caption names --token {cfg.token!r}, so its vectors would get no gradient: write it "
                         f"in the captions (e.g. 'a photo of {cfg.token}') or in --instance-prompt")
    state = open_run(cfg, resume)
    rank, world_size, device = setup_distributed(cfg.device)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(cfg.checkpoint or None, fast=False, device=device, tokenizer=cfg.tokenizer or None)
    pipe.text_encoder.eval(), pipe.unet.eval(), pipe.vae.eval()   # no dropout in these networks: eval = train
    size = pipe.config.image_size
    images, captions = load_folder(Path(cfg.data), cfg.instance_prompt or None, size)
    prior = None
    if cfg.class_prompt:                      # the model's own pictures of the class, before it changes
        folder = Path(cfg.class_dir or Path(cfg.out_dir) / "class_images")
        if rank == 0:
            class_images(pipe, folder, cfg.class_prompt, cfg.num_class_images, cfg.seed, progress=cfg.progress)
        if world_size > 1:
            dist.barrier()
        prior = class_images(pipe, folder, cfg.class_prompt, cfg.num_class_images, cfg.seed, progress=False)
    teacher = None
    if prior is not None and cfg.prior_target == "model":   # ε_θ₀: the model as it is now, frozen (before any hook)
        teacher = Denoiser(copy.deepcopy(pipe.text_encoder), copy.deepcopy(pipe.unet)).requires_grad_(False)
    saved, groups, extra = prepare_method(cfg, pipe, DEFAULT_LR["textual-inversion"])
    parameters = [p for group in groups for p in group["params"]]
    data = dict(zip(("mean", "std"), encode(pipe, images, device)), ids=pipe.tokenizer(captions))
    prior_data = dict(zip(("mean", "std"), encode(pipe, prior[0], device)), ids=pipe.tokenizer(prior[1]),
                      empty=pipe.tokenizer([""]).to(device)) if prior else None
    model = wrap(Denoiser(pipe.text_encoder, pipe.unet, extra), world_size, device)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    history, step = {"loss": [], "prior_loss": []}, 0
    if state is not None:
        for network, module in saved.items():
            module.load_state_dict(state[network])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generators"][rank])
        history["loss"], history["prior_loss"], step = state["loss"], state["vae_loss"], state["step"]
    schedule, scale = pipe.config.schedule(), pipe.config.latent_scale
    per_rank = max(1, cfg.batch // world_size)
    start = time.time()
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc=f"finetune ({cfg.method})",
               disable=not (cfg.progress and rank == 0))
    for step in bar:
        z_t, t, ids, target = draw_batch(data, per_rank, scale, schedule, generator, device)
        if prior_data is not None:            # one forward over both halves: [instance; class]
            pz, pt, pids, ptarget = draw_batch(prior_data, per_rank, scale, schedule, generator, device)
            if cfg.prior_uncond > 0:          # some class items with ∅, the prompt CFG's unconditional half reads
                drop = torch.rand(per_rank, generator=generator) < cfg.prior_uncond
                pids = torch.where(drop[:, None].to(device), prior_data["empty"], pids)
            if teacher is not None:           # the target ε_θ₀(x_t^pr, t, c) instead of the drawn ε′
                with torch.no_grad():
                    ptarget = teacher(pz, pt, pids)
            pred = model(torch.cat([z_t, pz]), torch.cat([t, pt]), torch.cat([ids, pids]))
            loss_inst, loss_prior = eps_loss(target, pred[:per_rank]), eps_loss(ptarget, pred[per_rank:])
            # L = ‖ε − ε̂(x_t, c_inst)‖² + λ‖ε′ − ε̂(x_t^pr, c_cls)‖²  (prior target model: ε′ → ε_θ₀(x_t^pr, t, c_cls))
            loss = loss_inst + cfg.prior_weight * loss_prior
            history["prior_loss"].append(loss_prior.item())
        else:
            loss = loss_inst = eps_loss(target, model(z_t, t, ids))   # L = ‖ε − ε_θ(z_t, t, c)‖²
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        history["loss"].append(loss_inst.item())
        bar.set_postfix(loss=f"{loss_inst.item():.4f}")
        done = step + 1
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == stop_at:
            checkpoint(cfg, saved, optimizer, generator, history, done, rank, world_size, pipe)
        if done == stop_at and done < cfg.steps:
            bar.close()
            return {**history, "output": None, "pipe": pipe}
    bar.close()
    if cfg.checkpoint_every and cfg.steps % cfg.checkpoint_every and stop_at != cfg.steps:
        checkpoint(cfg, saved, optimizer, generator, history, cfg.steps, rank, world_size, pipe)
    output = write_output(cfg, pipe, saved) if rank == 0 else None
    if world_size > 1:
        dist.barrier()
    return {**history, "output": output, "pipe": pipe, "seconds": time.time() - start}


def checkpoint(cfg, saved, optimizer, generator, history, step, rank, world_size, pipe) -> None:
    """ckpt.safetensors: the trainable state under state.py's network names, AdamW, every rank's generator, the
    losses (state.py's "vae_loss" slot holds the prior-preservation losses: a fine-tune has no autoencoder stage)."""
    generators = [generator.get_state()]
    if world_size > 1:
        generators = [None] * world_size
        dist.all_gather_object(generators, generator.get_state())
    if rank != 0:
        return
    networks = {name: {} for name in ("vae", "text_encoder", "unet")}
    networks.update({name: module.state_dict() for name, module in saved.items()})
    save_state(Path(cfg.out_dir) / CKPT_NAME, dict(
        **networks, stage="finetune", step=step, train_config=cfg.to_json(), model_config=pipe.config.to_json(),
        optimizer=optimizer.state_dict(), generators=generators, vae_loss=history["prior_loss"],
        loss=history["loss"]))


def write_output(cfg: FinetuneConfig, pipe, saved: dict) -> Path:
    """The finished fine-tune's file, written atomically: a LoRA, an embedding or a full single file (with --token,
    dreambooth and lora also write the new word's embedding file beside it)."""
    from safetensors.torch import save_file

    from ..checkpoint import save_official
    from ..textual_inversion import unload_textual_inversion
    metadata = {"ldm_scratch.finetune": cfg.to_json()}
    if cfg.token:                             # the new word's rows E_tok[V:], in the web UI's embedding format
        embeddings = pipe._embeddings
        vectors = pipe.text_encoder.token_embedding.weight.detach()[embeddings.base_rows:].cpu().contiguous()
        with replacing(cfg.embedding_output) as tmp:
            save_file({"emb_params": vectors}, str(tmp), metadata=metadata)
        if cfg.method == "textual-inversion":
            return cfg.output
        embeddings.loaded[cfg.token.lower()].vectors = vectors             # the pipe keeps the trained word
    path = cfg.output
    if cfg.method == "dreambooth":
        pipe.text_encoder.eval(), pipe.unet.eval()
        if not cfg.token:
            return save_official(path, pipe.text_encoder, pipe.unet, pipe.vae, pipe.config, overwrite=True)
        words = dict(embeddings.loaded)       # a model file holds the vocabulary's V rows: the word goes beside it
        unload_textual_inversion(pipe)                                      # E_tok [V + n, D] → [V, D]
        try:
            return save_official(path, pipe.text_encoder, pipe.unet, pipe.vae, pipe.config, overwrite=True)
        finally:
            embeddings.loaded.update(words)
            embeddings.install(pipe.tokenizer, pipe.text_encoder)
    layers = saved["unet"]
    tensors = layers.kohya_tensors() if cfg.lora_format == "kohya" else layers.diffusers_tensors()
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
