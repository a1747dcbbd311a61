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
# # 7. img2img and inpainting
#
# Both start the reverse process from something other than pure noise.
#
# **img2img**: encode the image, $z_0=s\cdot\mathcal E(x)$, noise it to an intermediate level with the forward
# process, $z_{t_\text{start}}=\sqrt{\bar\alpha_{t_\text{start}}}\,z_0+\sqrt{1-\bar\alpha_{t_\text{start}}}\,\varepsilon$,
# and run only the remaining steps with the new prompt. `strength` chooses the start: of `steps` steps, the last
# `int(steps × strength)` run.
#
# **Inpainting**: keep the pixels outside a mask, generate inside it — either by *mask blending* with a regular
# model, or with the 9-channel inpainting model trained for it.
#
# * `ldm_scratch/pipeline.py` — `StableDiffusion.img2img`, `StableDiffusion.inpaint`
# * `ldm_scratch/samplers/base.py` — `steps_to_run`, `Sampler.sample(x0=, strength=, after_step=)`,
#   `Sampler.noise_to_level`

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

# %% [markdown]
# ## Strength is a start time
#
# For 30 DDIM steps: the timestep the run starts at, and how much of the image survives there
# ($\sqrt{\bar\alpha_t}$, the coefficient of $z_0$). Strength 1 starts at the first step, $t=958$ for 30
# "leading" DDIM steps — almost pure noise, though SD's schedule still leaves $\sqrt{\bar\alpha}\approx0.09$ of
# the image there (notebook 2), which is why img2img at strength 1 can keep a hint of the layout.

# %%
from ldm_scratch.samplers import get_sampler
from ldm_scratch.samplers.base import steps_to_run

steps = 30
timesteps = get_sampler("ddim").timesteps(steps)                        # descending: 958, 925, …, 1 (leading)
strengths = np.linspace(0.05, 1.0, 96)
t_start = [timesteps[steps_to_run(steps, float(s), img2img=True)] for s in strengths]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
axes[0].step(strengths, t_start, where="post"); axes[0].set_xlabel("strength"); axes[0].set_ylabel("t_start")
axes[0].set_title(f"first timestep that runs ({steps} DDIM steps)")
axes[1].plot(strengths, pipe.schedule.alpha_bar[np.array(t_start, dtype=int)].sqrt())
axes[1].set_xlabel("strength"); axes[1].set_title(r"$\sqrt{\bar\alpha_{t_{start}}}$: the image's share")
plt.show()

# %% [markdown]
# ## img2img: a red circle asked to become a yellow star
#
# The seed is the same in every column. Low strength keeps the layout: at 0.2 (4 of the 20 steps) the shape
# stays where the circle was, round, but is already yellow: here the colour gives way before the shape does.
# From 0.4 on the star appears, still in the circle's place (with six points at 0.4 and 0.6, where the data
# set's stars have five); at 1.0 the prompt alone decides, from almost pure noise.

# %%
from ldm_scratch.data import render

init = render("circle", "red", "blue", size=config.image_size)             # a PIL image
prompt = "a yellow star on a blue background"
strengths = [0.2, 0.4, 0.6, 0.8, 1.0]
outputs = [pipe.img2img(prompt, init, strength=s, steps=20, guidance_scale=5.0, sampler="ddim", seed=0,
                        output_type="np", progress=False)[0] for s in strengths]
fig, axes = plt.subplots(1, len(strengths) + 1, figsize=(2 * (len(strengths) + 1), 2.3))
axes[0].imshow(init); axes[0].set_title("init image")
for ax, image, s in zip(axes[1:], outputs, strengths):
    ax.imshow(image); ax.set_title(f"strength {s}")
for ax in axes:
    ax.axis("off")
fig.suptitle(prompt); plt.show()

# %% [markdown]
# ## Inpainting with a regular model: mask blending
#
# A regular (4-channel) model has never seen a mask. The pipeline steers it instead: after every step $i$ the
# sampler's state $x$ is overwritten outside the hole by the original latents noised to the state's current
# level (`Sampler.noise_to_level`), with the mask $m$ at latent size (1 = repaint):
#
# $$x \leftarrow m\odot x + (1-m)\odot\bigl(\sqrt{\bar\alpha_{t_{i+1}}}\,z_0+\sqrt{1-\bar\alpha_{t_{i+1}}}\,\varepsilon\bigr).$$
#
# The model only ever sees a consistent noisy image; the kept part is exactly the original at the end. Its
# weakness: the hole's content cannot influence the kept part, so seams can show — and the mask is only as
# fine as the latent grid (8 pixels in SD, 4 in the tiny model).

# %%
image = render("square", "yellow", "green", size=config.image_size)
size = config.image_size
mask = np.zeros((size, size), dtype=np.float32)
hole = slice(size * 3 // 16, size * 13 // 16)                           # the square and a margin around it
mask[hole, hole] = 1.0                                                   # 1 = repaint
prompt = "a blue circle on a green background"
results = pipe.inpaint(prompt, image, mask, num_images=3, steps=20, guidance_scale=5.0, seed=0,
                       output_type="np", progress=False)
assert not pipe.is_inpainting_model
original = np.asarray(image) / 255                                       # [H, W, 3] in [0, 1]
panels = [original, np.repeat(mask[..., None], 3, axis=2), *results]
titles = ["image", "mask (white = repaint)", "seed 0", "seed 1", "seed 2"]
fig, axes = plt.subplots(1, len(panels), figsize=(2.1 * len(panels), 2.4))
for ax, panel, title in zip(axes, panels, titles):
    ax.imshow(panel); ax.set_title(title, fontsize=9)
    ax.set_xticks([]); ax.set_yticks([])                     # keep the frame: the mask's white part shows
fig.suptitle(f"mask blending: {prompt}"); plt.show()

far = np.ones((size, size), dtype=bool)
far[size // 8: -size // 8, size // 8: -size // 8] = False               # the kept frame, ≥ 4 px from the hole
x = torch.from_numpy(original).permute(2, 0, 1)[None].float() * 2 - 1    # [1, 3, H, W] in [−1, 1]
round_trip = ((vae.decode(vae.encode(x).mean).clamp(-1, 1)[0].permute(1, 2, 0) + 1) / 2).numpy()
print(f"kept frame, away from the hole: mean |output − original| = "
      f"{np.abs(results - original)[:, far].mean():.3f}; the VAE round trip alone: "
      f"{np.abs(round_trip - original)[far].mean():.3f}")

# %% [markdown]
# The circle replaces the square, and the faint outline of the hole in the green shows the seam. Even far from
# the hole the kept part is not quite the original — several times the round trip's error. The pipeline decodes
# the whole latent at once, and the decoder is not local: its GroupNorm layers normalise over the whole image
# and its middle block's self-attention looks at all of it, so what is painted in the hole shifts the colours of
# the frame a little. A pipeline that must keep pixels exactly pastes the original back outside the mask after
# decoding.

# %% [markdown]
# ## The 9-channel inpainting model
#
# `sd-v1-5-inpainting` was fine-tuned with a wider first convolution: its UNet reads 9 channels,
#
# $$\text{input} = \bigl[\,x_t\ (4),\ \ m\ (1),\ \ s\cdot\mathcal E\bigl(x\odot(1-m)\bigr)\ (4)\,\bigr],$$
#
# the noisy latent, the mask at latent size, and the latent of the image with the hole blanked (grey). The
# extra 5 channels are the same at every step (`StableDiffusion.inpaint` builds them once, `_eps_model` appends
# them), so the model sees what must be kept *and* can adapt the seam: it fills the hole itself, no blending.
# Only `input_conv` differs from the regular UNet (`UNetConfig(in_channels=9)`).
#
# No trained 9-channel tiny model ships, so here is one with random weights — the point is the plumbing: a
# forward hook shows the UNet input the pipeline builds. With the official file, load it like any other:
# `load_pipeline("weights/sd-v1-5-inpainting.ckpt")`, and `pipe.inpaint` switches to this mode by
# itself (`pipe.is_inpainting_model`).

# %%
import dataclasses

from ldm_scratch.pipeline import StableDiffusion
from ldm_scratch.unet import UNet

config9 = dataclasses.replace(config, unet=dataclasses.replace(config.unet, in_channels=9),
                              kind="sd-v1-inpainting", name="tiny-random-inpainting")
torch.manual_seed(0)
pipe9 = StableDiffusion(text_encoder, UNet(config9.unet).eval(), vae, config9, tokenizer=tokenizer)
print("is_inpainting_model:", pipe9.is_inpainting_model, "  input_conv:", pipe9.unet.input_conv)

seen = []
hook = pipe9.unet.register_forward_hook(lambda module, args, output: seen.append(args[0]))
try:
    out = pipe9.inpaint(prompt, image, mask, steps=4, guidance_scale=5.0, seed=0, output_type="np", progress=False)
finally:
    hook.remove()
unet_input = seen[0]
print("UNet input at step 0:", tuple(unet_input.shape), "= [uncond; cond] × (4 noisy + 1 mask + 4 masked-image)")
fig, axes = plt.subplots(1, 9, figsize=(14, 1.8))
names = [f"x_t[{c}]" for c in range(4)] + ["mask"] + [f"masked z[{c}]" for c in range(4)]
for c, (ax, name) in enumerate(zip(axes, names)):
    ax.imshow(unet_input[-1, c].numpy(), cmap="gray" if c == 4 else "RdBu_r"); ax.set_title(name, fontsize=8)
    ax.set_xticks([]); ax.set_yticks([])                     # keep the frame: the mask's white part shows
plt.show()

# %% [markdown]
# **On the official weights.** Everything here runs unchanged on Stable Diffusion v1.5 once you have the file
# (see `weights/README.md`): replace the model cell's `ldm_scratch.load_pipeline()` by
# `ldm_scratch.load_pipeline("weights/v1-5-pruned-emaonly.safetensors")`. Expect the same calls at 512²; mask
# blending works with any SD v1 checkpoint, and the inpainting checkpoint gives seamless fills at strength 1.
