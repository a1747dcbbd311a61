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
# # 13. SD 2: v-prediction, and the zero-terminal-SNR fix
#
# Stable Diffusion 2's 768-v model changed what the UNet predicts: not the noise $\varepsilon$ (SD v1, the
# seed's eq 4.3) but the *velocity* (Salimans & Ho 2022)
#
# $$v = \sqrt{\bar\alpha_t}\,\varepsilon - \sqrt{1-\bar\alpha_t}\,x_0 .$$
#
# Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed") then showed why SD cannot draw
# a pure black or pure white image, and that v-prediction is what makes their fix possible. This notebook draws
# the three possible targets over $t$, the signal-to-noise ratio at the last step with and without their
# rescaling, and the tiny model's brightness experiment (`scripts/zero_snr_experiment.py`; its results are read
# from `docs/zero_snr_experiment.json`, nothing is retrained here).
#
# * `ldm_scratch/diffusion.py` — `v_from_x0_eps`, `x0_from_v`, `eps_and_x0`, `rescale_zero_terminal_snr`,
#   `rescale_guidance`, `ScheduleConfig(prediction_type=…, rescale_zero_terminal_snr=…)`
# * `ldm_scratch/train.py` — `training_target`; `ldm-scratch train --prediction v --zero-snr`
#
# On the official SD 2 768-v file the same code runs: `load_pipeline(path, prediction_type="v_prediction")`.

# %%
# %matplotlib inline
import json
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import ldm_scratch
from ldm_scratch.diffusion import (Schedule, ScheduleConfig, classifier_free_guidance, eps_and_x0, rescale_guidance,
                                   v_from_x0_eps)

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets: plain bars are fine
plt.rcParams["image.interpolation"] = "nearest"   # show 64² images as their pixels (smoothing would blur them)
torch.manual_seed(0)
torch.set_num_threads(1)   # tiny tensors: one thread is as fast as two

# %% [markdown]
# ## Three targets: $\varepsilon$, $x_0$ and $v$
#
# Given $x_t=\sqrt{\bar\alpha_t}\,x_0+\sqrt{1-\bar\alpha_t}\,\varepsilon$, a network may predict any one of
# $\varepsilon$, $x_0$ or $v$: each determines the other two (`diffusion.eps_and_x0`). Writing
# $\sqrt{\bar\alpha_t}=\cos\phi_t$, $\sqrt{1-\bar\alpha_t}=\sin\phi_t$, $x_t$ moves on a circle from $x_0$
# ($\phi=0$) to $\varepsilon$ ($\phi=\pi/2$) and $v = dx_t/d\phi$ is its velocity: a mix of $\varepsilon$ and
# $-x_0$ whose weights slide from $(1, 0)$ to $(0, 1)$.
#
# What matters for sampling is how an error in the prediction becomes an error in $\hat x_0$ (which every sampler
# needs): from $\hat x_0 = (x_t-\sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$ an error $\delta$
# in $\hat\varepsilon$ costs $\sqrt{(1-\bar\alpha_t)/\bar\alpha_t}\,\delta=\sigma_t\,\delta$ — unbounded as
# $\bar\alpha_t\to0$ — while from $\hat x_0=\sqrt{\bar\alpha_t}\,x_t-\sqrt{1-\bar\alpha_t}\,\hat v$ an error in
# $\hat v$ costs at most $\delta$.

# %%
sd = Schedule()
zero = Schedule(ScheduleConfig(rescale_zero_terminal_snr=True))
t = np.arange(sd.n_train_steps)

# one latent "image" x0 and one noise draw, both 1-D for the picture: the targets at every t
g = torch.Generator().manual_seed(0)
x0, eps = torch.randn(256, generator=g, dtype=torch.float64), torch.randn(256, generator=g, dtype=torch.float64)
v = v_from_x0_eps(x0[None], eps[None], sd.alpha_bar[:, None])                    # [T, 256]

fig, axes = plt.subplots(1, 3, figsize=(15, 3.4))
axes[0].plot(t, sd.alpha_bar.sqrt(), label=r"weight of $\varepsilon$ in $v$: $\sqrt{\bar\alpha_t}$")
axes[0].plot(t, (1 - sd.alpha_bar).sqrt(), label=r"weight of $-x_0$ in $v$: $\sqrt{1-\bar\alpha_t}$")
axes[0].set_title("v mixes the two other targets"); axes[0].legend(fontsize=8)
axes[1].plot(t, np.ones_like(t), label=r"$\varepsilon$: std 1 at every t")
axes[1].plot(t, np.ones_like(t) * x0.std().item(), "--", label=r"$x_0$: the data's std")
axes[1].plot(t, v.std(dim=1), label=r"$v$ (std 1 too: cos² + sin² = 1)")
axes[1].plot(t, (v @ x0 / (v.norm(dim=1) * x0.norm())), label=r"corr($v$, $x_0$)")
axes[1].set_title("the targets over t"); axes[1].legend(fontsize=8)
axes[2].semilogy(t, sd.sigmas, label=r"$\hat\varepsilon$ error × $\sqrt{(1-\bar\alpha)/\bar\alpha}$")
axes[2].semilogy(t, (1 - sd.alpha_bar).sqrt(), label=r"$\hat v$ error × $\sqrt{1-\bar\alpha}$")
axes[2].semilogy(t, sd.alpha_bar.sqrt() / (1 - sd.alpha_bar).sqrt(), ":",
                 label=r"$\hat x_0$ error: $\hat\varepsilon$ gets × $\sqrt{\bar\alpha/(1-\bar\alpha)}$")
axes[2].set_title(r"how a prediction error reaches $\hat x_0$"); axes[2].legend(fontsize=8)
for ax in axes:
    ax.set_xlabel("t")
plt.show()
print(f"at t = 999 (SD's schedule): an ε̂ error reaches x̂₀ × {sd.sigmas[-1]:.1f}, a v̂ error × "
      f"{(1 - sd.alpha_bar[-1]).sqrt():.3f}")

# %% [markdown]
# The conversions are exact, whichever way round (checked here on a batch at four timesteps):

# %%
x0_b, eps_b = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
ts = torch.tensor([0, 300, 700, 999])
x_t = sd.q_sample(x0_b, ts, eps_b)
v_b = sd.v_from_x0_eps(x0_b, ts, eps_b)
a = sd.alpha_bar[ts].float()[:, None, None, None]
eps_hat, x0_hat = eps_and_x0(x_t, v_b, a, "v_prediction")
print("max |ε̂ − ε| from v:", (eps_hat - eps_b).abs().max().item(), "  max |x̂₀ − x₀| from v:",
      (x0_hat - x0_b).abs().max().item())
assert torch.allclose(eps_hat, eps_b, atol=1e-5) and torch.allclose(x0_hat, x0_b, atol=1e-5)

# %% [markdown]
# ## The last step's SNR, with and without rescaling
#
# SD's schedule ends at $\bar\alpha_{999}\approx0.0047$: $\text{SNR}_T=\bar\alpha_T/(1-\bar\alpha_T)\approx
# 0.0047$, not 0. So $x_T=0.068\,x_0+0.998\,\varepsilon$ in training still holds a trace of the image — above
# all its *mean*: the mean of a $16\times16$ noise channel has std $1/16=0.0625$, about as large as
# $0.068\,\bar x_0$. The network learns to read the overall brightness off $x_T$; at sampling time $x_T$ is pure
# noise, so it reads "average brightness" and cannot make an image much darker or brighter than that.
#
# Lin et al.'s Algorithm 1 (`diffusion.rescale_zero_terminal_snr`) shifts and scales $\sqrt{\bar\alpha_t}$ so
# that the last one is exactly 0 and the first unchanged:
# $\sqrt{\bar\alpha'_t}=(\sqrt{\bar\alpha_t}-\sqrt{\bar\alpha_T})\,\sqrt{\bar\alpha_1}/(\sqrt{\bar\alpha_1}-
# \sqrt{\bar\alpha_T})$. Then $x_T=\varepsilon$ exactly, in training as in sampling. An ε-predicting network is
# then useless at $t=T$: $x_T=\varepsilon$ and "predict ε" is the identity, while
# $\hat x_0=(x_T-\hat\varepsilon)/\sqrt{\bar\alpha_T}$ is $0/0$. With $v$, $v_T=-x_0$: the network must
# predict the image from nothing but the caption — exactly the job at the first sampling step.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
axes[0].plot(t, sd.alpha_bar.sqrt(), label="SD (scaled linear)")
axes[0].plot(t, zero.alpha_bar.sqrt(), "--", label="rescaled: zero terminal SNR")
axes[0].set_title(r"$\sqrt{\bar\alpha_t}$"); axes[0].legend()
axes[0].set_xlabel("t")
for schedule, style, name in ((sd, "-", "SD"), (zero, "--", "rescaled")):
    snr = schedule.alpha_bar / (1 - schedule.alpha_bar)
    axes[1].semilogy(t[-60:], snr[-60:], style, label=name)
axes[1].set_title(r"SNR$_t$ over the last 60 steps (log scale; the rescaled one reaches 0)"); axes[1].legend()
axes[1].set_xlabel("t")
plt.show()
for schedule, name in ((sd, "SD's schedule"), (zero, "rescaled     ")):
    a_T = schedule.alpha_bar[-1].item()
    print(f"{name}: ᾱ_0 = {schedule.alpha_bar[0]:.6f}   ᾱ_T = {a_T:.6f}   √ᾱ_T = {a_T ** 0.5:.4f}   "
          f"SNR_T = {a_T / (1 - a_T):.2e}   β_T = {schedule.betas[-1]:.4f}")
assert zero.alpha_bar[-1] == 0 and abs(zero.alpha_bar[0] - sd.alpha_bar[0]) < 1e-15

# %% [markdown]
# How much does $x_T$ say about brightness? Encode a "pure black" and a "pure white" image with the bundled tiny
# model's autoencoder, noise both to $t=T$ with the *same* $\varepsilon$, and compare the channel means of
# $x_T$. With SD's schedule they differ by $\sqrt{\bar\alpha_T}\,\Delta\bar z_0$ — a signal the network can and
# does learn to use; with the rescaled one they are identical.

# %%
from ldm_scratch.data import render
from ldm_scratch.data.shapes import to_tensor

pipe = ldm_scratch.load_pipeline()   # the bundled tiny model, ldm_scratch/bundled/
images = torch.stack([to_tensor(render("circle", "red", bg)) for bg in ("pure black", "pure white")])
with torch.no_grad():
    z0 = pipe.vae.encode(images).mean * pipe.config.latent_scale                    # [2, 4, 16, 16]
noise = torch.randn(1, *z0.shape[1:], generator=torch.Generator().manual_seed(1)).expand_as(z0)
for schedule, name in ((sd, "SD's schedule"), (zero, "rescaled")):
    x_T = schedule.q_sample(z0, torch.tensor([999, 999]), noise)
    means = x_T.mean(dim=(2, 3))                                                       # [2, 4]
    print(f"{name:14s} channel means of x_T — black: {means[0].numpy().round(3)}, white: "
          f"{means[1].numpy().round(3)}   |difference| {(means[0] - means[1]).abs().max():.3f}"
          f"  (noise mean's std: {1 / 16:.4f})")

# %% [markdown]
# ## Sampling with zero SNR: trailing timesteps and guidance rescale
#
# Two more changes come with the schedule. **Trailing timesteps**: SD's "leading" spacing starts 30 steps at
# $t=958$, never at $t=999$; with $\bar\alpha_T=0$ the first step must be $t=T$ (where $x_T$ really is pure
# noise), so the grid is counted back from $T$ (`timestep_spacing="trailing"` in every sampler).
# **Guidance rescale** (§3.4, `diffusion.rescale_guidance`): classifier-free guidance inflates the prediction's
# standard deviation, which zero-SNR models turn into over-exposure; the guided output is scaled back to the
# conditional prediction's std and blended, $x=\varphi\,x_{\text{cfg}}\,\sigma_{\text{cond}}/\sigma_{\text{cfg}}
# +(1-\varphi)\,x_{\text{cfg}}$, with $\varphi=0.7$.

# %%
from ldm_scratch.samplers import spaced_timesteps

print("leading :", spaced_timesteps(30, "leading", 1)[:5], "…", spaced_timesteps(30, "leading", 1)[-3:])
print("trailing:", spaced_timesteps(30, "trailing", 0)[:5], "…", spaced_timesteps(30, "trailing", 0)[-3:])
cond, uncond = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
guided = classifier_free_guidance(uncond, cond, 7.5)
for phi in (0.0, 0.7, 1.0):
    print(f"φ = {phi}: std of the guided output {rescale_guidance(guided, cond, phi).std():.3f} "
          f"(conditional {cond.std():.3f})")

# %% [markdown]
# ## The experiment: can the tiny model draw pure black and pure white?
#
# `scripts/zero_snr_experiment.py` fine-tunes stage 2 (text encoder + UNet) of the bundled model — the same
# number of steps, batch, learning rate and seed in every arm — on the training data plus the two extra
# backgrounds (`ShapesDataset(..., extreme_backgrounds=True)`), once per arm: ε or v, SD's schedule or zero
# terminal SNR, every arm with offset noise 0 except one that adds it (the other known fix). The bundled model as
# it ships is the first row (it never saw the words "pure black"). Shown here: the second run, 500 fine-tuning
# steps per arm (the first, 100 steps, is in the README). The measure was fixed before anything ran:

# %%
ROOT = Path(ldm_scratch.__file__).resolve().parent.parent   # the repository (this notebook runs in a temp folder)
record = json.loads((ROOT / "docs" / "zero_snr_experiment_500steps.json").read_text())
print(record["measure"])
print("\nfine-tune of every arm:", record["fine_tune"], "steps:", record["results"][-1]["fine_tune_steps"])

# %%
from IPython.display import Markdown, display

display(Markdown((ROOT / "docs" / "zero_snr_experiment_500steps.md").read_text()))

# %%
results = record["results"]   # empty until the script has run


def draw(results):
    """Bar charts of the background error per arm."""
    labels = [r["arm"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3), sharey=True, dpi=50)
    for ax, background in zip(axes, ("pure black", "pure white")):
        colours = ["grey" if r["arm"] == "bundled" else "C0" if r["prediction"] == "epsilon" else "C1" for r in results]
        ax.bar(labels, [r[background]["error"] for r in results], color=colours)
        ax.axhline(10, color="k", lw=0.8, ls=":")
        ax.set_title(f"{background}: mean |border pixel − target| (0–255)")
        ax.tick_params(axis="x", rotation=30)
    # the samples themselves (one row per arm: a circle of every colour, 6 on pure black, then 5 on pure white,
    # seed 0) are docs/zero_snr_samples_500steps.png, left out here to keep the notebooks small


if results:
    draw(results)
else:
    print("No arm has run yet: python3 scripts/zero_snr_experiment.py, then rebuild this notebook "
          "(python3 scripts/notebooks.py build 13)")

# %% [markdown]
# **What came out.** After 500 steps every arm but ε + zero SNR draws the ordinary data again (control 0.7–1.0),
# and the order is the paper's: v-prediction with zero terminal SNR comes closest on both backgrounds (black error
# 73, white 18), plain v next (76, 27); the ε arms, asked for pure black, draw a *light* background (error
# 202–210) and are behind on white (35–51; offset noise helps there, not on black). ε with zero SNR stays broken
# (control 0.1): at $t = T$ its $\hat x_0 = (x_T - \hat\varepsilon)/\sqrt{\bar\alpha_T}$ multiplies ε̂'s error by
# 4096 — why Lin et al. pair zero SNR with v-prediction. Nothing reaches "within 10" on black, and the line under
# the table says why: every arm keeps the bundled autoencoder, which never saw these backgrounds and decodes a
# rendered pure black picture as dark green (70.6 levels off); the v arms' black is that green. (After 100 steps
# the order was the same, but the v arms had not yet finished switching their target: control 0.3.)
