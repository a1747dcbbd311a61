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
# # 2. Forward diffusion: how noise is added
#
# Training data is destroyed by a fixed Markov chain of $T=1000$ small Gaussian steps (the seed's eq 4.1):
#
# $$q(x_t\mid x_{t-1}) = \mathcal N\!\left(x_t;\ \sqrt{1-\beta_t}\,x_{t-1},\ \beta_t I\right),$$
#
# which composes in closed form to
#
# $$q(x_t\mid x_0) = \mathcal N\!\left(x_t;\ \sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t)I\right),\qquad
#   \bar\alpha_t=\prod_{s\le t}(1-\beta_s),\qquad x_t = \sqrt{\bar\alpha_t}\,x_0+\sqrt{1-\bar\alpha_t}\,\varepsilon .$$
#
# The network learns to undo it (eq 4.2, $p_\theta(x_{t-1}\mid x_t)$). In Stable Diffusion $x_0$ is a VAE
# latent (eq 4.5), but the process does not care what $x_0$ is.
#
# * `ldm_scratch/diffusion.py` — `Schedule` (β, ᾱ, σ), `Schedule.q_sample`, `Schedule.posterior`,
#   `Schedule.eps_to_x0`

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

# %% [markdown]
# ## The schedule: $\beta_t$, $\bar\alpha_t$ and the signal-to-noise ratio
#
# SD v1 uses the "scaled linear" schedule: $\beta_t$ is linear in $\sqrt\beta$ from $0.00085$ to $0.012$
# (`Schedule.__init__`). The signal-to-noise ratio $\text{SNR}_t=\bar\alpha_t/(1-\bar\alpha_t)$ falls by more
# than five orders of magnitude, from about 1200 at $t=0$ to 0.005 at $t=999$ — but not to zero: $\bar\alpha_{999}\approx 0.0047$, so the last step still contains a
# trace of the image (Lin et al. 2024 discuss what that costs). Dashed: the original DDPM linear schedule
# ($10^{-4}\to0.02$), for comparison.

# %%
from ldm_scratch.diffusion import Schedule

sched = Schedule()
t = np.arange(sched.n_train_steps)
ddpm_beta = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ddpm_alpha_bar = torch.cumprod(1 - ddpm_beta, 0)

fig, axes = plt.subplots(1, 3, figsize=(14, 3.3))
axes[0].plot(t, sched.betas, label="SD v1 (scaled linear)"); axes[0].plot(t, ddpm_beta, "--", label="DDPM linear")
axes[0].set_title(r"$\beta_t$"); axes[0].legend()
axes[1].plot(t, sched.alpha_bar.sqrt(), label=r"$\sqrt{\bar\alpha_t}$ (signal)")
axes[1].plot(t, (1 - sched.alpha_bar).sqrt(), label=r"$\sqrt{1-\bar\alpha_t}$ (noise)")
axes[1].plot(t, ddpm_alpha_bar.sqrt(), "--", color="C0", alpha=0.5)
axes[1].set_title("coefficients of $x_0$ and $\\varepsilon$"); axes[1].legend()
axes[2].semilogy(t, sched.alpha_bar / (1 - sched.alpha_bar), label="SD v1")
axes[2].semilogy(t, ddpm_alpha_bar / (1 - ddpm_alpha_bar), "--", label="DDPM linear")
axes[2].set_title(r"SNR$_t = \bar\alpha_t / (1-\bar\alpha_t)$"); axes[2].legend()
for ax in axes:
    ax.set_xlabel("t")
plt.show()
print(f"ᾱ_0 = {sched.alpha_bar[0]:.5f}, ᾱ_999 = {sched.alpha_bar[-1]:.5f}, "
      f"SNR_999 = {sched.alpha_bar[-1] / (1 - sched.alpha_bar[-1]):.2e}, σ_999 = {sched.sigmas[-1]:.2f}")

# %% [markdown]
# ## An image, noised
#
# A picture from the captioned-shapes data set (`ldm_scratch/data/shapes.py`, `render`), in $[-1,1]$, pushed
# through `q_sample` at several $t$ with **one** noise draw $\varepsilon$ — so only the mixing coefficients
# change from panel to panel.

# %%
from ldm_scratch.data import render
from ldm_scratch.data.shapes import to_tensor

x0 = to_tensor(render("circle", "red", "blue", size=64))[None]          # [1, 3, 64, 64] in [-1, 1]
eps = torch.randn_like(x0)
ts = [0, 50, 100, 250, 500, 750, 999]

def show_row(images, titles, suptitle):
    fig, axes = plt.subplots(1, len(images), figsize=(2 * len(images), 2.3))
    for ax, image, title in zip(axes, images, titles):
        ax.imshow(((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()); ax.set_title(title); ax.axis("off")
    fig.suptitle(suptitle); plt.show()

show_row([sched.q_sample(x0, t_, eps)[0] for t_ in ts], [f"t={t_}" for t_ in ts],
         "pixels: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε")

# %% [markdown]
# ### … and its latent
#
# Stable Diffusion noises the **latent** $z_0 = s\cdot\mathcal E(x)$ ($s$ = the latent scale, 0.18215 for SD v1;
# see notebook 4). Shown: latent channel 0, and what the VAE decoder makes of each noisy latent. The same $t$
# destroys more of the picture here than in pixels: at $t=500$ the noised pixels above still show a plain
# circle, the decoded latent only a blob. One latent value stands for a whole patch of pixels — the latent is
# 8× smaller on each side in SD, 4× for the tiny model (64² images, 16² latents) — so noise on one value
# scrambles a patch, not a pixel. (At $t=0$ the decoded circle is orange, not red: the tiny autoencoder's
# reconstruction error, measured in notebook 4.)

# %%
pipe = ldm_scratch.load_pipeline()      # the bundled tiny model, ldm_scratch/bundled/ (13 MB)
config, tokenizer, text_encoder, unet, vae = pipe.config, pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
for module in (text_encoder, unet, vae):
    module.eval().requires_grad_(False)   # inference only: no gradients to keep
print(f"{config.name}: {config.image_size}² images, "
      f"latents {config.latent_channels}×{config.image_size // config.vae.downsample_factor}², "
      f"latent scale {config.latent_scale:.4f}")

# %%
z0 = vae.encode(x0).mean * config.latent_scale                        # [1, 4, 16, 16], ≈ unit variance
eps_z = torch.randn_like(z0)
noisy = [sched.q_sample(z0, t_, eps_z) for t_ in ts]
fig, axes = plt.subplots(1, len(ts), figsize=(2 * len(ts), 2.3))
for ax, z, t_ in zip(axes, noisy, ts):
    ax.imshow(z[0, 0].numpy(), cmap="RdBu_r", vmin=-3, vmax=3); ax.set_title(f"t={t_}"); ax.axis("off")
fig.suptitle(f"latent channel 0 of z_t, {tuple(z0.shape)}"); plt.show()
show_row(vae.decode(torch.cat(noisy) / config.latent_scale), [f"t={t_}" for t_ in ts],
         "VAE decoder applied to z_t")

# %% [markdown]
# ## Checking $q(x_t\mid x_0)$ empirically
#
# Run the one-step chain $x_t=\sqrt{1-\beta_t}\,x_{t-1}+\sqrt{\beta_t}\,\varepsilon_t$ a thousand times on
# many copies of three pixel values, and compare the mean and variance at a few $t$ with the closed form
# $\mathcal N(\sqrt{\bar\alpha_t}x_0,(1-\bar\alpha_t))$. With $N$ samples the standard error of the mean is
# $\sqrt{(1-\bar\alpha_t)/N}$ — the table shows the difference in those units (|z| ≲ 3 is agreement).
# Timesteps are 0-based as in the checkpoints: after applying $\beta_0$ the sample is at $t=0$.

# %%
N = 50_000
pixel_values = torch.tensor([-1.0, 0.0, 0.8])
gen = torch.Generator().manual_seed(0)
x = pixel_values.repeat(N, 1)                                            # [N, 3] copies of x_0
keep = {100: None, 500: None, 999: None, 499: None}
for step in range(sched.n_train_steps):                                  # eq 4.1, one step at a time
    beta = sched.betas[step].item()
    x = (1 - beta) ** 0.5 * x + beta**0.5 * torch.randn(x.shape, generator=gen)
    if step in keep:
        keep[step] = x.clone()

print(" t   x_0    mean (chain)  √ᾱ·x_0   z     var (chain)   1−ᾱ    z")
for step in (100, 500, 999):
    alpha_bar = sched.alpha_bar[step]
    for j, value in enumerate(pixel_values):
        mean, var = keep[step][:, j].mean(), keep[step][:, j].var()
        z_mean = (mean - alpha_bar.sqrt() * value) / ((1 - alpha_bar) / N).sqrt()
        z_var = (var - (1 - alpha_bar)) / ((1 - alpha_bar) * (2 / N) ** 0.5)
        print(f"{step:4d} {value:5.1f}   {mean:9.4f}   {alpha_bar.sqrt() * value:8.4f} {z_mean:5.1f}  "
              f"{var:9.4f}   {1 - alpha_bar:8.4f} {z_var:5.1f}")
        assert abs(z_mean) < 5 and abs(z_var) < 5

# %%
step, j = 500, 2
alpha_bar = sched.alpha_bar[step]
grid = np.linspace(-4, 4, 200)
density = np.exp(-(grid - alpha_bar.sqrt().item() * 0.8) ** 2 / (2 * (1 - alpha_bar.item())))
density /= np.sqrt(2 * np.pi * (1 - alpha_bar.item()))
fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(keep[step][:, j].numpy(), bins=100, density=True, alpha=0.6, label="1000-step chain")
ax.plot(grid, density, "k", label=r"closed form $\mathcal{N}(\sqrt{\bar\alpha_t}x_0, 1-\bar\alpha_t)$")
ax.set_title(f"x_0 = 0.8, t = {step}"); ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ### The reverse step the network imitates
#
# Given $x_0$, one step back is Gaussian too (DDPM eqs 6–7; `Schedule.posterior`):
#
# $$q(x_{t-1}\mid x_t,x_0)=\mathcal N\!\left(c_0\,x_0 + c_t\,x_t,\ \tilde\beta_t\right),\quad
#   c_0=\frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1-\bar\alpha_t},\ \
#   c_t=\frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t},\ \
#   \tilde\beta_t=\frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t .$$
#
# The reverse process $p_\theta(x_{t-1}\mid x_t)$ of eq 4.2 is this with $x_0$ replaced by the network's guess
# $\hat x_0$. Check: regress the chain's $x_{499}$ on its $x_{500}$ (same $x_0$) — the slope, intercept and
# residual variance are $c_t$, $c_0x_0$ and $\tilde\beta_t$.

# %%
from ldm_scratch.diffusion import posterior_coefficients

j, value = 2, 0.8
x_prev, x_t = keep[499][:, j], keep[500][:, j]
slope = ((x_t - x_t.mean()) * (x_prev - x_prev.mean())).mean() / x_t.var()
intercept = x_prev.mean() - slope * x_t.mean()
residual = (x_prev - intercept - slope * x_t).var()
c0, ct, var = posterior_coefficients(sched.alpha_bar[500], sched.alpha_bar[499])
print(f"slope     {slope:.5f}   c_t      {ct:.5f}")
print(f"intercept {intercept:.5f}   c_0·x_0  {c0 * value:.5f}")
print(f"residual  {residual:.3e}   β̃_t      {var:.3e}")
x0_one, xt_zero = torch.full((1,), value, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
mean, variance = sched.posterior(x0_one, xt_zero, 500)      # x_t = 0 leaves only the c_0·x_0 term of the mean
assert torch.allclose(mean, c0 * value) and torch.allclose(variance, var)
assert abs(slope - ct) < 0.01 and abs(residual / var - 1) < 0.03


# %% [markdown]
# ## The seed's listing swaps the coefficients
#
# The seed document's `diffuse` function (section 3.2) writes
#
# ```python
# noisy_latents = torch.sqrt(1 - alphas[timesteps]) * latents + torch.sqrt(alphas[timesteps]) * noise
# ```
#
# i.e. $x_t=\sqrt{1-\bar\alpha_t}\,x_0+\sqrt{\bar\alpha_t}\,\varepsilon$ — the two coefficients of eq 4.1 swapped.
# Since $\bar\alpha_t$ *falls* with $t$, this process runs backwards: at $t=999$ it returns
# $0.998\,x_0+0.069\,\varepsilon$, almost the clean image, and at $t=0$ almost pure noise. A model trained on
# it would learn nothing about the schedule every sampler assumes. `ldm_scratch/diffusion.py` follows the
# equation, and `tests/test_diffusion.py` checks it.

# %%
def diffuse_seed(latents, noise, timesteps):          # the seed's listing, with alphas = ᾱ
    alphas = sched.alpha_bar.float()
    return torch.sqrt(1 - alphas[timesteps]) * latents + torch.sqrt(alphas[timesteps]) * noise

for t_ in (0, 500, 999):
    seed_x, right_x = diffuse_seed(x0, eps, t_), sched.q_sample(x0, t_, eps)
    corr = lambda a: torch.corrcoef(torch.stack([a.flatten(), x0.flatten()]))[0, 1].item()
    print(f"t={t_:3d}: correlation with x_0 — seed's listing {corr(seed_x):.3f}, eq 4.1 {corr(right_x):.3f}")
show_row([diffuse_seed(x0, eps, t_)[0] for t_ in ts], [f"t={t_}" for t_ in ts],
         "the seed's swapped listing: t=999 is almost the clean image")


# %% [markdown]
# Its `denoise` companion, $\hat x_0=(x_t-\hat\varepsilon\,(1-\bar\alpha)/\sqrt{\bar\alpha})/\sqrt{1-\bar\alpha}$,
# does not even invert its own `diffuse`: even with the *true* noise it returns
# $x_0+\varepsilon\,(2\bar\alpha-1)/\sqrt{\bar\alpha(1-\bar\alpha)}$. Eq 4.1 solved for $x_0$
# (`Schedule.eps_to_x0`: $\hat x_0=(x_t-\sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$) recovers
# $x_0$ exactly from the true noise.

# %%
def denoise_seed(noisy, noise_pred, timesteps):        # the seed's listing, given the true noise
    alphas = sched.alpha_bar.float()
    a = alphas[timesteps]
    return (noisy - noise_pred * (1 - a) / torch.sqrt(a)) / torch.sqrt(1 - a)

print("  t   seed: max|x̂₀ − x₀|   eps_to_x0: max|x̂₀ − x₀|")
for t_ in (10, 250, 500, 750, 990):
    seed_err = (denoise_seed(diffuse_seed(x0, eps, t_), eps, t_) - x0).abs().max()
    ours_err = (sched.eps_to_x0(sched.q_sample(x0, t_, eps), t_, eps) - x0).abs().max()
    print(f"{t_:4d}   {seed_err:16.3f}   {ours_err:18.2e}")

# %% [markdown]
# **On the official weights.** Everything here runs unchanged on Stable Diffusion v1.5 once you have the file
# (see `weights/README.md`): replace the model cell's `ldm_scratch.load_pipeline()` by
# `ldm_scratch.load_pipeline("weights/v1-5-pruned-emaonly.safetensors")`. Expect the same schedule (it is fixed
# by the checkpoint's training), a `[1, 4, 64, 64]` latent for a 512² image, and decoded noisy latents that look
# like smeared colour fields.
