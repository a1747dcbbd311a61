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
# # 5. Samplers: from noise to a latent in a few steps
#
# A sampler turns the noise predictor into a generator. Each one discretises the same reverse process; they
# differ in how many network calls they need for a given accuracy. All of them see the model the same way,
# `eps_model(x_t, t) -> ε̂`, and report their current guess of the clean latent after every step,
#
# $$\hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon}{\sqrt{\bar\alpha_t}}\qquad\text{(`Schedule.eps_to_x0`)},$$
#
# through `callback(i, t, x0_pred)`.
#
# * `ldm_scratch/samplers/` — one file per family: `ddim.py` (DDIM), `euler.py` (Euler, Euler-ancestral),
#   `lms.py`, `heun.py`, `dpmpp.py` (DPM-Solver++ 2M), `plms.py`, `ddpm.py`; `base.py` for what they share
#   (`Denoiser`, timestep spacing, the σ-parameterisation)
# * `ldm_scratch/samplers/__init__.py` — `get_sampler(name, **options)`
#
# The σ-view (Karras et al. 2022) helps: divide $x_t$ by $\sqrt{\bar\alpha_t}$ to get
# $x_\sigma = x_0+\sigma\varepsilon$ with $\sigma_t=\sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$. The deterministic
# samplers then all solve one ODE, the *probability-flow ODE*
#
# $$\frac{dx_\sigma}{d\sigma} = \frac{x_\sigma - D(x_\sigma,\sigma)}{\sigma} = \hat\varepsilon,\qquad
#   D(x_\sigma,\sigma)=\hat x_0,$$
#
# Euler with one network call per step, Heun and DPM++ with second-order corrections, LMS and PLMS with
# several earlier slopes.

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
from ldm_scratch.diffusion import Schedule
from ldm_scratch.samplers import SAMPLERS, get_sampler

sched = Schedule()
print("samplers:", ", ".join(SAMPLERS))

# %% [markdown]
# ## A test problem with a known answer: Gaussian data
#
# If the data were $x_0\sim\mathcal N(\mu, s^2 I)$, then $x_t\sim\mathcal N(\sqrt{\bar\alpha_t}\mu,\
# (\bar\alpha_t s^2+1-\bar\alpha_t)I)$ and the best possible noise prediction is in closed form:
#
# $$\varepsilon^*(x_t,t)=\mathbb E[\varepsilon\mid x_t]=
#   \frac{\sqrt{1-\bar\alpha_t}\,\bigl(x_t-\sqrt{\bar\alpha_t}\,\mu\bigr)}{\bar\alpha_t s^2+1-\bar\alpha_t}.$$
#
# So is the exact solution of the probability-flow ODE: in σ-scaling,
# $(x_\sigma-\mu)/\sqrt{s^2+\sigma^2}$ stays constant along it. Every deterministic sampler can then be compared
# with the exact answer from the same start noise. Fractional $t$ (σ-samplers ask for them) is handled through
# σ: $\bar\alpha=1/(1+\sigma^2)$.

# %%
MU, S = 0.5, 1.0

def gaussian_eps(x_t, t):
    sigma = float(sched.t_to_sigma(t.double()))
    alpha_bar = 1 / (1 + sigma**2)
    return (1 - alpha_bar) ** 0.5 * (x_t - alpha_bar**0.5 * MU) / (alpha_bar * S**2 + 1 - alpha_bar)

def exact_answer(sampler, noise, steps):
    """Where the exact ODE takes the sampler's own start, in the scaling and at the level the sampler stops."""
    if hasattr(sampler, "timesteps"):                  # DDPM family: start x_t = ε at the first timestep
        t0 = int(sampler.timesteps(steps)[0])
        sigma_start = float(sched.sigmas[t0])
        x_start = noise * (sigma_start**2 + 1) ** 0.5        # the same point in σ-scaling
        final = getattr(sampler, "final_alpha_bar", 1.0)     # SD v1.5 stops at ᾱ_0, not at 1
        sigma_end, out_scale = ((1 - final) / final) ** 0.5, final**0.5
    else:                                              # σ-samplers: start at σ_max · ε, stop at σ = 0
        sigmas, _ = sampler.sigmas_and_timesteps(steps)
        sigma_start = float(sigmas[0])
        x_start = noise * sampler.initial_scale(sigma_start)
        sigma_end, out_scale = 0.0, 1.0
    invariant = (x_start - MU) / (S**2 + sigma_start**2) ** 0.5     # constant along the ODE
    return out_scale * (MU + invariant * (S**2 + sigma_end**2) ** 0.5)

noise = torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
runs_to_compare = {"ddim": {}, "euler": {}, "heun": {}, "lms": {}, "plms": {}, "dpmpp_2m": {},
                   "dpmpp_2m karras": {"karras": True}}
steps_list = [4, 6, 10, 15, 25, 50, 100]
errors = {}
for label, options in runs_to_compare.items():
    sampler = get_sampler(label.split()[0], **options)
    errors[label] = [(sampler.sample(gaussian_eps, noise, steps) - exact_answer(sampler, noise, steps)).abs().max()
                     .item() for steps in steps_list]
print("max |sample − exact ODE solution| over 4096 samples")
print("steps " + "".join(f"{label:>16s}" for label in errors))
for k, steps in enumerate(steps_list):
    print(f"{steps:5d} " + "".join(f"{errors[label][k]:16.1e}" for label in errors))

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
for label, values in errors.items():
    ax.loglog(steps_list, values, marker="o", label=label, ls="--" if "karras" in label else "-")
ax.loglog(steps_list, [errors["euler"][0] * steps_list[0] / n for n in steps_list], "k:", label="∝ 1/steps")
ax.loglog(steps_list, [errors["lms"][2] * (steps_list[2] / n) ** 2 for n in steps_list], "k-.",
          label="∝ 1/steps²")
ax.set_xlabel("steps (heun: 2 network calls per step)"); ax.set_ylabel("max error")
ax.set_title("error vs steps on Gaussian data"); ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# Reading the plot: DDIM and Euler are first order (error ∝ 1/steps); Heun, LMS and PLMS reach high accuracy in
# a few dozen steps. DPM++ 2M is a second-order method, yet with diffusers' default "linspace" timesteps it
# looks first order: that grid stops at $t\approx T/\text{steps}$ and jumps from there to $\sigma=0$ with
# $x=\hat x_0$, an error $\approx\tfrac12\sigma_\text{min}^2|x-\mu|/s^2$ with $\sigma_\text{min}^2\propto 1/\text{steps}$.
# With `karras=True` its σ's run down to $\sigma(t{=}0)\approx0.029$ and it shows its order. Every curve
# bottoms out near that last jump, a property of the schedule rather than the solver
# (`scripts/sampler_convergence.py` prints the full table, ancestral samplers included). Each sampler is
# compared with the exact solution from *its own* start: the "leading" samplers (DDIM, PLMS) start at
# $t=751$ for 4 steps, not 999.
#
# ## Why a few steps are enough
#
# DDIM and DPM++ are *exponential integrators*: they solve the linear part of the ODE exactly and only
# approximate how $\hat x_0$ changes. Written in $\lambda=-\log\sigma$, the DDIM update is exact whenever
# $\hat x_0$ is constant over a step:
#
# $$x_{\sigma_{i+1}} = \hat x_0 + \frac{\sigma_{i+1}}{\sigma_i}\,\bigl(x_{\sigma_i}-\hat x_0\bigr).$$
#
# And $\hat x_0$ changes slowly and smoothly: below, along the exact trajectory from one start value, $x_\sigma$
# falls from about 19 to 1.8 while $D(x_\sigma,\sigma)=\hat x_0$ moves by about one, along a gentle S-curve in
# $\log\sigma$. A solver that steps in $\log\sigma$ and treats $\hat x_0$ as locally constant (DDIM) or
# linear (DPM++ 2M uses the last two) has little to get wrong, and covers the range in ten or twenty steps.
# Euler treats the slope $\hat\varepsilon$ as constant instead; its 8-step $\hat x_0$'s (dots) lag behind.

# %%
sigmas = np.geomspace(float(sched.sigmas[-1]), float(sched.sigmas[0]), 200)      # σ_max = 14.6 … σ_min = 0.029
x_T = 1.3 * sigmas[0]                                                       # Euler's start for ε = 1.3
x_sigma = MU + (x_T - MU) / np.sqrt(S**2 + sigmas[0] ** 2) * np.sqrt(S**2 + sigmas**2)
x0_hat = MU + S**2 / (S**2 + sigmas**2) * (x_sigma - MU)           # D*(x_σ, σ) = E[x_0 | x_σ]
euler = get_sampler("euler")
trajectory = []
record = lambda i, t, x0_pred: trajectory.append((float(sched.t_to_sigma(t, "linear")), x0_pred.item()))
euler.sample(gaussian_eps, torch.full((1, 1, 1, 1), 1.3, dtype=torch.float64), 8, callback=record)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
axes[0].semilogx(sigmas, x_sigma); axes[0].set_title(r"exact trajectory $x_\sigma$"); axes[0].invert_xaxis()
axes[1].semilogx(sigmas, x0_hat, label=r"exact $D(x_\sigma,\sigma)=\hat x_0$")
axes[1].semilogx(*zip(*trajectory), "o", label="Euler, 8 steps: x0_pred per step"); axes[1].invert_xaxis()
axes[1].set_title(r"$\hat x_0$ along the way"); axes[1].legend(fontsize=8)
for ax in axes:
    ax.set_xlabel(r"$\sigma$ (time runs right →)")
plt.show()

# %% [markdown]
# ## The same start noise through four samplers, on the model
#
# Now the real thing: the (tiny) UNet with classifier-free guidance (notebook 6) as `eps_model`, one start
# noise, four samplers, and the $\hat x_0$ each reports at every step, decoded by the VAE. This is exactly what
# `pipe.txt2img(..., sampler=name, callback=...)` does inside (`ldm_scratch/pipeline.py`).

# %%
pipe = ldm_scratch.load_pipeline()      # the bundled tiny model, ldm_scratch/bundled/ (13 MB)
config, tokenizer, text_encoder, unet, vae = pipe.config, pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
for module in (text_encoder, unet, vae):
    module.eval().requires_grad_(False)   # inference only: no gradients to keep
print(f"{config.name}: {config.image_size}² images, "
      f"latents {config.latent_channels}×{config.image_size // config.vae.downsample_factor}², "
      f"latent scale {config.latent_scale:.4f}")

# %%
from ldm_scratch.diffusion import classifier_free_guidance

prompt, guidance_scale, steps = "a yellow star on a purple background", 5.0, 12
context = text_encoder(tokenizer([prompt, ""]))                 # [2, 77, D]: conditional, unconditional

def eps_model(x_t, t):
    eps_cond, eps_uncond = unet(torch.cat([x_t, x_t]), t, context).chunk(2)
    return classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)

h = config.image_size // vae.config.downsample_factor
start = torch.randn(1, config.latent_channels, h, h, generator=torch.Generator().manual_seed(42))

runs = {}
for name in ["ddim", "euler", "dpmpp_2m", "lms"]:
    x0_preds = []
    latent = get_sampler(name, schedule=pipe.schedule).sample(
        eps_model, start, steps, callback=lambda i, t, x0_pred: x0_preds.append(x0_pred))
    runs[name] = (x0_preds, latent)

show = [0, 1, 2, 4, 7, steps - 1]
latents = torch.cat([torch.cat([x0_preds[i] for i in show] + [latent]) for x0_preds, latent in runs.values()])
pictures = ((vae.decode(latents / config.latent_scale).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
fig, axes = plt.subplots(len(runs), len(show) + 1, figsize=(1.8 * (len(show) + 1), 1.9 * len(runs)))
for ax, picture in zip(axes.flat, pictures):
    ax.imshow(picture.numpy()); ax.set_xticks([]); ax.set_yticks([])
for ax, i in zip(axes[0], show):
    ax.set_title(f"x̂₀ after step {i}", fontsize=8)
axes[0, -1].set_title("result", fontsize=8)
for ax, name in zip(axes[:, 0], runs):
    ax.set_ylabel(name)
fig.suptitle(prompt); plt.show()

# %% [markdown]
# DDIM and Euler, one slope per step, have the star by step 4 and then only refine it. DPM++ 2M and LMS build
# each step from earlier slopes too, which pays off on smooth problems (the Gaussian above) but not here: with
# guidance 5 this small model's $\hat x_0$ jumps from step to step (yellow, green, white), DPM++ 2M wanders
# and lands on the star only in its last steps, and LMS — a polynomial through up to four past slopes —
# amplifies the jumps until its result is no picture at all. (It is diffusers' LMS to 1e-6, see
# `tests/test_sampler_parity.py`; on this model it fails at 20 and 30 steps too with guidance 5, and gives
# clean shapes at guidance 1.) A first-order sampler is the robust choice when the model or the guidance is
# rough.
#
# How far each step's $\hat x_0$ still is from that sampler's final latent:

# %%
fig, ax = plt.subplots(figsize=(6, 3))
for name, (x0_preds, latent) in runs.items():
    ax.plot([(x - latent).norm().item() / latent.norm().item() for x in x0_preds], marker=".", label=name)
ax.set_xlabel("step"); ax.set_ylabel("‖x̂₀ − final‖ / ‖final‖"); ax.legend(); ax.set_yscale("log")
plt.show()

# %% [markdown]
# The pipeline runs the same loop: `pipe.txt2img(prompt, latents=start, sampler="ddim", ...)` gives the DDIM
# row's final latent (it batches the unconditional and conditional halves in the other order, which changes
# nothing but rounding).

# %%
latent = pipe.txt2img(prompt, latents=start, sampler="ddim", steps=steps, guidance_scale=guidance_scale,
                      output_type="latent", progress=False)
print(f"max |pipeline − loop above| = {(latent - runs['ddim'][1]).abs().max():.2e}")
torch.testing.assert_close(latent, runs["ddim"][1], atol=1e-4, rtol=1e-4)

# %% [markdown]
# **On the official weights.** Everything here runs unchanged on Stable Diffusion v1.5 once you have the file
# (see `weights/README.md`): replace the model cell's `ldm_scratch.load_pipeline()` by
# `ldm_scratch.load_pipeline("weights/v1-5-pruned-emaonly.safetensors")`. Expect 512² images after decoding;
# 20–30 steps of DPM++ 2M or Euler look as good as 50 of DDIM, and the x̂₀ strip shows composition first, then
# colours, then texture.
