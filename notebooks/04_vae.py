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
# # 4. The VAE: pixels ↔ latents
#
# Latent diffusion (Rombach et al. 2022) runs the diffusion in the latent space of an autoencoder:
#
# $$\text{encode: } x\,[B,3,H,W]\in[-1,1] \mapsto q(z\mid x)=\mathcal N(\mu,\operatorname{diag}\sigma^2),\ \
#   z\,[B,4,H/8,W/8];\qquad \text{decode: } z\mapsto\hat x .$$
#
# SD v1 maps 512×512×3 pixels (786,432 numbers) to 64×64×4 latents (16,384): 48× fewer, which is why one UNet
# step is affordable. The diffusion itself sees $z_0 = s\cdot z$ with the *latent scale* $s$ (eq 4.5).
#
# * `ldm_scratch/vae.py` — `VAE.encode`, `VAE.decode`, `DiagonalGaussian` (`.mean`, `.std`, `.sample`, `.kl`)
# * `ldm_scratch/configs.py` — `ModelConfig.latent_scale`

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
from ldm_scratch.data import ShapesDataset

data = ShapesDataset("train", size=config.image_size, length=16, seed=1)
images = torch.stack([data[i][0] for i in range(len(data))])               # [16, 3, H, W] in [-1, 1]
captions = [data[i][1] for i in range(len(data))]
posterior = vae.encode(images)
print("images", tuple(images.shape), "→ posterior mean and std", tuple(posterior.mean.shape))
print(f"compression: {images[0].numel() / posterior.mean[0].numel():.0f}× fewer numbers; "
      f"VAE {sum(p.numel() for p in vae.parameters()):,} parameters")

# %% [markdown]
# ## The posterior $q(z\mid x)$
#
# The encoder predicts a mean and a log-variance per latent number (`DiagonalGaussian`); a sample is
# $z=\mu+\sigma\varepsilon$ (the reparameterisation trick). The KL term
# $\tfrac12\sum(\mu^2+\sigma^2-1-\log\sigma^2)$ was weighted very lightly in training (1e-5 here, 1e-6 for
# SD), so the KL is large and $\sigma$ small next to $\mu$: the encoder is nearly deterministic, and pipelines
# often just use the mean.

# %%
print(f"posterior std: median {posterior.std.median():.2e}, max {posterior.std.max():.2e}; "
      f"|mean| median {posterior.mean.abs().median():.3f}; "
      f"σ/|μ| median {(posterior.std / posterior.mean.abs()).median():.3f}")
print(f"KL(q(z|x) ‖ N(0, I)) per image: {posterior.kl().mean():.1f} nats")
z_sample = posterior.sample(torch.Generator().manual_seed(0))
print(f"max |sample − mean| = {(z_sample - posterior.mean).abs().max():.2e}")

# %% [markdown]
# ## The four latent channels
#
# The latent is still an image: each of its pixels summarises an 8×8 patch (for SD v1; 4×4 for the tiny model).
# Its channels are not RGB, but they are spatial: flat where the image is flat, with the strongest values along
# the edges of the shape.

# %%
z = posterior.mean
fig, axes = plt.subplots(3, 5, figsize=(10, 6.2))
for row in range(3):
    axes[row, 0].imshow(((images[row] + 1) / 2).permute(1, 2, 0).numpy())
    axes[row, 0].set_title(captions[row][2:].replace(" on a ", "\non "), fontsize=7)
    for ch in range(4):
        axes[row, ch + 1].imshow(z[row, ch].numpy(), cmap="RdBu_r")
        axes[row, ch + 1].set_title(f"channel {ch}", fontsize=8)
for ax in axes.flat:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## The latent scale
#
# The diffusion process assumes data of roughly unit variance ($q(x_T)\approx\mathcal N(0,I)$ only then). SD v1's
# autoencoder produces latents with std ≈ 5.5, so the pipeline multiplies by $s=0.18215\approx1/5.49$ after
# encoding and divides before decoding (`ldm_scratch/pipeline.py`; never inside the VAE). The number was
# measured once on a batch of training images — do the same here. (The scaled latents are far from Gaussian:
# flat colours make peaks. Their overall spread of about 1 is what the schedule needs.)

# %%
std = z.std().item()
print(f"std of unscaled latents over {len(images)} images: {std:.3f} → 1/std = {1 / std:.4f}")
print(f"the model's latent scale: {config.latent_scale}  → scaled std {std * config.latent_scale:.3f}")
print("per channel mean:", [round(v, 3) for v in z.mean(dim=(0, 2, 3)).tolist()])
print("per channel std: ", [round(v, 3) for v in z.std(dim=(0, 2, 3)).tolist()])
fig, ax = plt.subplots(figsize=(6, 2.8))
for ch in range(4):
    ax.hist((z[:, ch] * config.latent_scale).flatten().numpy(), bins=60, histtype="step", label=f"channel {ch}")
ax.set_title("scaled latents s·z"); ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Reconstruction
#
# $\hat x = \mathcal D(z)$ with $z$ the posterior mean. The error is what the whole of Stable Diffusion can
# never do better than: the UNet only ever produces latents.

# %%
recon = vae.decode(z).clamp(-1, 1)
mse = ((recon - images) ** 2).mean(dim=(1, 2, 3))                      # on [-1, 1]
psnr = 10 * torch.log10(4 / mse)                                         # peak-to-peak range 2 → 2² = 4
print(f"reconstruction MSE {mse.mean():.4f}, PSNR {psnr.mean():.1f} dB (min {psnr.min():.1f} dB)")
fig, axes = plt.subplots(3, 6, figsize=(10, 5.4))
for k in range(6):
    axes[0, k].imshow(((images[k] + 1) / 2).permute(1, 2, 0).numpy())
    axes[1, k].imshow(((recon[k] + 1) / 2).permute(1, 2, 0).numpy())
    axes[2, k].imshow((recon[k] - images[k]).abs().mean(0).numpy(), cmap="magma", vmin=0, vmax=1)
for ax, label in zip(axes[:, 0], ["x", "D(E(x))", "|error|"]):
    ax.set_ylabel(label)
for ax in axes.flat:
    ax.set_xticks([]); ax.set_yticks([])
plt.show()

# %% [markdown]
# What the decoder makes of a latent that no image produced: a draw from $\mathcal N(0,I)/s$ — the starting
# point of every txt2img run, before the UNet has done anything.

# %%
noise = torch.randn(4, *z.shape[1:], generator=torch.Generator().manual_seed(0))
decoded = vae.decode(noise / config.latent_scale).clamp(-1, 1)
fig, axes = plt.subplots(1, 4, figsize=(8, 2.2))
for ax, image in zip(axes, decoded):
    ax.imshow(((image + 1) / 2).permute(1, 2, 0).numpy()); ax.axis("off")
plt.show()

# %% [markdown]
# The full-size SD v1 autoencoder on the `meta` device (shapes without memory): a 512² image becomes a
# `[1, 4, 64, 64]` latent. Its encoder pads its stride-2 convolutions by (0, 1, 0, 1) — right and bottom only —
# as the original was trained (`vae.py`, `Downsample`); a symmetric pad shifts reconstructions by pixels.

# %%
from ldm_scratch.vae import VAE, VAEConfig

with torch.device("meta"):
    full = VAE(VAEConfig())
    print(f"SD v1 VAE: {sum(p.numel() for p in full.parameters()):,} parameters")
    print("512² image → latent", tuple(full.encode(torch.zeros(1, 3, 512, 512)).mean.shape),
          "→ decoded", tuple(full.decode(torch.zeros(1, 4, 64, 64)).shape))
del full

# %% [markdown]
# **On the official weights.** Everything here runs unchanged on Stable Diffusion v1.5 once you have the file
# (see `weights/README.md`): replace the model cell's `ldm_scratch.load_pipeline()` by
# `ldm_scratch.load_pipeline("weights/v1-5-pruned-emaonly.safetensors")`. Expect latent std ≈ 5.5 on natural
# images (hence 0.18215), sharp reconstructions with PSNR in the high 20s dB, and encode/decode of one 512²
# image taking seconds on a CPU.
