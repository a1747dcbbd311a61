# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 8. Train your own
#
# The bundled model was trained from scratch by `ldm_scratch/train.py` (`train(TrainConfig())`, or
# `python -m ldm_scratch.train --out runs/tiny`: about half an hour on 2 CPU cores). Two stages, as in latent
# diffusion:
#
# 1. the autoencoder, on pixels: $\ \mathcal L_\text{VAE}=|x-\hat x|+(x-\hat x)^2+\lambda_\text{KL}\,\mathrm{KL}(q(z\mid x)\,\|\,\mathcal N(0,I))$;
# 2. with the autoencoder frozen, the text encoder and the UNet together, on scaled latents $z_0=s\cdot z$:
#
# $$t\sim\mathcal U\{0,\dots,999\},\ \ \varepsilon\sim\mathcal N(0,I),\ \ z_t=\sqrt{\bar\alpha_t}\,z_0+\sqrt{1-\bar\alpha_t}\,\varepsilon,\qquad
#   \mathcal L=\mathbb E\,\|\varepsilon-\varepsilon_\theta(z_t,t,c)\|^2\quad\text{(eq 4.3)},$$
#
# with the caption replaced by "" 10 % of the time so that classifier-free guidance works (notebook 6).
#
# This notebook runs stage 2 for about a minute — from freshly initialised networks, on top of the bundled
# model's trained autoencoder — with a live loss curve and samples along the way. Each step is the loop body of
# `train()` (without its checkpointing and multi-process plumbing, and with $z_0$ the posterior mean where
# `train()` draws a sample), built from `train.py`'s own pieces: `render_training_set`, `tokenize_all`,
# `build_models`, `TextToEps`, `learning_rate`, `generate`, and `diffusion.eps_loss`.

# %%
# %matplotlib inline
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

import ldm_scratch

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets: plain bars are fine
plt.rcParams["image.interpolation"] = "nearest"   # show 64² images as their pixels (smoothing would blur them)
torch.manual_seed(0)
# The tensors here are tiny: one thread is as fast as two, and never stalls when another program wants a core.
torch.set_num_threads(1)

# %%
pipe = ldm_scratch.load_pipeline()      # the bundled tiny model, ldm_scratch/bundled/ (13 MB)
config, tokenizer, text_encoder, unet, vae = pipe.config, pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
for module in (text_encoder, unet, vae):
    module.eval().requires_grad_(False)   # inference only: no gradients to keep
print(f"{config.name}: {config.image_size}² images, "
      f"latents {config.latent_channels}×{config.image_size // config.vae.downsample_factor}², "
      f"latent scale {config.latent_scale:.4f}")

# %%
import time

from IPython.display import clear_output, display

from ldm_scratch.diffusion import eps_loss
from ldm_scratch.train import (TextToEps, build_models, generate, learning_rate, render_training_set,
                               to_model_range, tokenize_all)

N_IMAGES, BATCH, STEPS, PEAK_LR, WARMUP = 256, 32, 100, 2e-3, 10
images, captions = render_training_set(N_IMAGES, config.image_size, seed=0)   # uint8 [N, 3, 64, 64]
with torch.no_grad():                                     # the frozen autoencoder: encode the data once
    z0_all = torch.cat([vae.encode(to_model_range(b)).mean for b in images.split(128)]) * config.latent_scale
ids_all = tokenize_all(tokenizer, captions)                                   # [N, 77]
empty_ids = tokenizer([""])[0]
print(f"{N_IMAGES} images → latents {tuple(z0_all.shape)}, std {z0_all.std():.3f} "
      "(the latent scale makes it ≈ 1)")

new_text_encoder, new_unet, _ = build_models(config, seed=0)                  # fresh weights, same sizes
model = TextToEps(new_text_encoder, new_unet).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.01)
generator = torch.Generator().manual_seed(0)
print(f"training {sum(p.numel() for p in model.parameters()):,} parameters")

# %% [markdown]
# As a yardstick, the bundled (fully trained) model's loss on fixed evaluation batches. At large $t$ the noise
# is almost all there is to see, and $\varepsilon$ is nearly $x_t$ itself; at small $t$ it is a tiny
# perturbation of the image, and predicting it means knowing the image exactly. Pictures of a few flat colours
# come close to allowing that, so the bundled model's average is small (split by $t$ further down); on natural
# images, whose fine detail no model can know, it stays well above zero.

# %%
eval_gen = torch.Generator().manual_seed(123)
eval_batches = []
for _ in range(4):
    index = torch.randint(N_IMAGES, (64,), generator=eval_gen)
    t = torch.randint(1000, (64,), generator=eval_gen)
    eps = torch.randn(z0_all[index].shape, generator=eval_gen)
    eval_batches.append((pipe.schedule.q_sample(z0_all[index], t, eps), t, ids_all[index], eps))

@torch.no_grad()
def eval_loss(eps_net):
    return float(np.mean([eps_loss(eps, eps_net(z_t, t, ids)).item() for z_t, t, ids, eps in eval_batches]))

reference = eval_loss(lambda z_t, t, ids: unet(z_t, t, text_encoder(ids)))
print(f"bundled model's loss: {reference:.3f}")

# %%
sample_captions = ["a red circle on a blue background", "a yellow square on a green background",
                   "a white star on a purple background", "a blue ring on a yellow background"]
losses, evals, snapshots = [], [], []
start = time.time()
for step in range(STEPS):
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, STEPS, PEAK_LR, WARMUP)
    index = torch.randint(N_IMAGES, (BATCH,), generator=generator)
    z0 = z0_all[index]
    t = torch.randint(1000, (BATCH,), generator=generator)                   # t ~ U{0, …, 999}
    eps = torch.randn(z0.shape, generator=generator)                         # ε ~ N(0, I)
    eps += 0.1 * torch.randn(BATCH, z0.shape[1], 1, 1, generator=generator)  # offset noise, as train() adds
    z_t = pipe.schedule.q_sample(z0, t, eps)                                 # z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
    drop = torch.rand(BATCH, generator=generator) < 0.1                      # caption → "" (for CFG)
    ids = torch.where(drop[:, None], empty_ids, ids_all[index])
    loss = eps_loss(eps, model(z_t, t, ids))                                 # ‖ε − ε_θ(z_t, t, c)‖²
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    losses.append(loss.item())

    if (step + 1) % 25 == 0:                                                 # live: loss curve + samples
        model.eval()
        evals.append((step + 1, eval_loss(model)))
        snapshots.append((step + 1, generate(new_text_encoder, new_unet, vae, tokenizer, config,
                                             sample_captions, seed=0, steps=10, guidance_scale=4.0)))
        model.train()
        clear_output(wait=True)
        fig, axes = plt.subplots(1, 2, figsize=(12, 3), gridspec_kw={"width_ratios": [1.3, 1]})
        axes[0].plot(losses, alpha=0.4, label="training batch")
        axes[0].plot(*zip(*evals), "o-", label="evaluation batches")
        axes[0].axhline(reference, color="k", ls="--", label="bundled model")
        axes[0].set_xlabel("step"); axes[0].set_ylabel("ε-loss"); axes[0].set_ylim(0, 1.2); axes[0].legend()
        axes[1].imshow(torch.cat(list(snapshots[-1][1]), dim=2).permute(1, 2, 0).numpy()); axes[1].axis("off")
        axes[1].set_title(f"samples after {step + 1} steps ({time.time() - start:.0f} s)")
        display(fig); plt.close(fig)

# %% [markdown]
# The samples at each snapshot (rows), for the four captions (columns), and the bundled model's for the same
# captions and seed. In 100 steps the loss falls by an order of magnitude, yet the samples are still coloured
# noise. The bundled model took 2,500 steps of 64 images (this run: 100 steps of 32, 50× fewer images seen),
# half an hour on 2 cores.

# %%
bundled = generate(text_encoder, unet, vae, tokenizer, config, sample_captions, seed=0, steps=10, guidance_scale=4.0)
rows = [(f"step {step}", grid) for step, grid in snapshots] + [("bundled", bundled)]
fig, axes = plt.subplots(len(rows), 1, figsize=(6, 1.6 * len(rows)))
for ax, (label, grid) in zip(axes, rows):
    ax.imshow(torch.cat(list(grid), dim=2).permute(1, 2, 0).numpy()); ax.set_xticks([]); ax.set_yticks([])
    ax.set_ylabel(label, fontsize=8)
plt.show()

# %% [markdown]
# Where the short run stands, noise level by noise level (the evaluation batches split by $t$):

# %%
@torch.no_grad()
def loss_by_t(eps_net, edges=(0, 100, 300, 600, 1000)):
    """Mean ε-loss of the evaluation samples whose t falls in each [edges[k], edges[k+1])."""
    per_sample = torch.cat([((eps - eps_net(z_t, t, ids)) ** 2).mean(dim=(1, 2, 3))
                            for z_t, t, ids, eps in eval_batches])
    ts = torch.cat([t for _, t, _, _ in eval_batches])
    return [per_sample[(ts >= lo) & (ts < hi)].mean().item() for lo, hi in zip(edges[:-1], edges[1:])]

model.eval()
buckets = ["0–99", "100–299", "300–599", "600–999"]
fig, ax = plt.subplots(figsize=(6, 2.8))
for k, (label, values) in enumerate([("after 100 steps", loss_by_t(model)),
                                     ("bundled", loss_by_t(lambda z_t, t, ids: unet(z_t, t, text_encoder(ids))))]):
    ax.bar(np.arange(len(buckets)) + 0.4 * k, values, width=0.4, label=label)
ax.set_xticks(np.arange(len(buckets)) + 0.2, buckets); ax.set_xlabel("t"); ax.set_yscale("log")
ax.set_ylabel("ε-loss"); ax.legend()
plt.show()

# %% [markdown]
# Both models find small $t$ hardest. The short run is furthest behind at large $t$ — about 20× the bundled
# model's loss above $t=600$, against 6× below $t=100$ — and large $t$ is where a sample's layout and colours are
# decided, from almost pure noise: that is why its samples show no shapes yet.

# %% [markdown]
# ## The full run
#
# ```bash
# python -m ldm_scratch.train --out runs/tiny          # both stages, the bundled model's recipe (TrainConfig)
# python -m ldm_scratch.train --help                   # every TrainConfig field is a flag
# ```
#
# It writes `runs/tiny/model.safetensors` in the official single-file layout (config in its metadata), resumable
# checkpoints and sample grids; `ldm_scratch.load_pipeline("runs/tiny/model.safetensors")` loads the result
# for every other notebook. In Python: `from ldm_scratch.train import TrainConfig, train;
# history = train(TrainConfig(out_dir="runs/tiny"))` returns the loss curves of both stages.
#
# **On the official weights.** SD v1 was trained the same way (stage 2 only: its autoencoder was trained
# separately) on LAION image–caption pairs for hundreds of thousands of GPU hours — nothing to rerun on a
# laptop, but the loss above is the very same line of code.
