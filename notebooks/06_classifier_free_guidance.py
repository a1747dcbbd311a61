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
# # 6. Classifier-free guidance
#
# One network, two predictions per step: with the prompt $c$ and with the empty prompt $\varnothing$
# (`CLIP("")`). The sampler is given their extrapolation (the seed's eq 4.4; Ho & Salimans 2022):
#
# $$\hat\varepsilon_\theta(x_t,t,c)=\varepsilon_\theta(x_t,t,\varnothing)+s\cdot\bigl(\varepsilon_\theta(x_t,t,c)-\varepsilon_\theta(x_t,t,\varnothing)\bigr).$$
#
# $s=0$ ignores the prompt, $s=1$ is the plain conditional model, $s>1$ goes *further* in the direction the
# prompt points. Why it works: $\varepsilon$ is a scaled score, $\varepsilon_\theta\approx-\sqrt{1-\bar\alpha_t}\,
# \nabla\log p(x_t)$, so the guided prediction is the score of $p(x_t)\,p(c\mid x_t)^s$ — an implicit classifier
# $\nabla\log p(c\mid x_t)=\nabla\log p(x_t\mid c)-\nabla\log p(x_t)$, sharpened by the power $s$. The model
# learns $\varepsilon_\theta(\cdot,\varnothing)$ because training replaces 10 % of the captions by ""
# (`ldm_scratch/train.py`, `TrainConfig.caption_dropout`).
#
# * `ldm_scratch/diffusion.py` — `classifier_free_guidance`
# * `ldm_scratch/pipeline.py` — `StableDiffusion._eps_model` (one UNet call on the batch `[uncond; cond]`),
#   `txt2img(..., guidance_scale=, negative_prompt=)`

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
# ## One step, taken apart
#
# A latent noised to $t=600$, the two predictions, and what each guidance scale makes of them, shown as the
# clean image it implies, $\hat x_0=(x_t-\sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$.
# Without the prompt ($s=0$) the guess is a pale blur; the plain conditional model ($s=1$) guesses a yellow
# blob on blue; larger $s$ pushes the blob to the caption's red — and, at this one step, tints the background
# green as well: the extrapolation overshoots.

# %%
from ldm_scratch.diffusion import classifier_free_guidance

prompt = "a red circle on a blue background"
side = config.image_size // config.vae.downsample_factor
noise = torch.randn(1, config.latent_channels, side, side, generator=torch.Generator().manual_seed(1))
x_t = pipe.schedule.q_sample(torch.zeros_like(noise), 600, noise)
context = text_encoder(tokenizer(["", prompt]))                          # [∅; c]
eps_uncond, eps_cond = unet(torch.cat([x_t, x_t]), torch.tensor(600), context).chunk(2)

torch.testing.assert_close(classifier_free_guidance(eps_uncond, eps_cond, 1.0), eps_cond)    # s = 1: conditional
torch.testing.assert_close(classifier_free_guidance(eps_uncond, eps_cond, 0.0), eps_uncond)  # s = 0: unconditional
ratio = (eps_cond - eps_uncond).norm() / eps_uncond.norm()
print(f"‖ε_c − ε_∅‖ / ‖ε_∅‖ = {ratio:.3f}  (the guidance direction is small)")

scales = [0.0, 1.0, 3.0, 7.5]
x0_preds = torch.cat([pipe.schedule.eps_to_x0(x_t, 600, classifier_free_guidance(eps_uncond, eps_cond, s))
                      for s in scales])
pictures = (vae.decode(x0_preds / config.latent_scale).clamp(-1, 1) + 1) / 2
fig, axes = plt.subplots(1, len(scales), figsize=(2.2 * len(scales), 2.4))
for ax, picture, s in zip(axes, pictures, scales):
    ax.imshow(picture.permute(1, 2, 0).numpy()); ax.set_title(f"x̂₀ at t=600, s={s}"); ax.axis("off")
plt.show()

# %% [markdown]
# ## A guidance-scale sweep
#
# Same seeds, same sampler, only $s$ changes (columns). At $s=1$ this model already draws most captions
# (the checker below counts), with soft, wobbly shapes; $s$ = 2–4 sharpens them (the square's corners); at
# 7.5 — SD's usual default — the first artefacts appear (colour fringes on the star), and at 12 the images fall
# apart into coloured noise: the extrapolation has left the range of latents the network has seen. (The reds
# and yellows come out orange at every $s$: that is the tiny autoencoder's colour error, notebook 4, not
# guidance.)

# %%
prompts = ["a red circle on a blue background", "a yellow square on a green background",
           "a white star on a purple background"]
sweep = [1.0, 2.0, 4.0, 7.5, 12.0]
grid = [pipe.txt2img(prompts, guidance_scale=s, steps=15, sampler="dpmpp_2m", seed=0, output_type="np",
                     progress=False) for s in sweep]                     # each [3, H, W, 3]
fig, axes = plt.subplots(len(prompts), len(sweep), figsize=(1.9 * len(sweep), 2 * len(prompts)))
for col, images in enumerate(grid):
    axes[0, col].set_title(f"s = {sweep[col]}")
    for row, image in enumerate(images):
        axes[row, col].imshow(image); axes[row, col].set_xticks([]); axes[row, col].set_yticks([])
for row, p in enumerate(prompts):
    axes[row, 0].set_ylabel(p[2:].replace(" on a ", "\non "), fontsize=7)
plt.show()

# %% [markdown]
# ### Measured, not eyeballed
#
# The shapes data set comes with a checker that reads shape, colour and background back from the pixels
# (`ldm_scratch/data/checker.py`, `check`). The fraction of images it reads as exactly their caption, for
# twelve training captions and two seeds each, as a function of $s$:

# %%
from ldm_scratch.data import caption, check, train_combinations

combos = train_combinations()[::12][:12]
captions = [caption(*c) for c in combos]
accuracy = []
for s in [1.0, 2.0, 4.0, 7.5]:
    images = pipe.txt2img(captions, guidance_scale=s, steps=15, num_images=2, seed=0, output_type="np",
                          progress=False)
    expected = [combo for combo in combos for _ in range(2)]             # num_images per prompt, in order
    accuracy.append(np.mean([check(image).matches(*combo) for image, combo in zip(images, expected)]))
    print(f"s = {s:4.1f}: {accuracy[-1]:.0%} of {len(images)} images match their caption")

# %% [markdown]
# ## Negative prompts
#
# A negative prompt simply takes the place of $\varnothing$:
# $\hat\varepsilon=\varepsilon_\theta(x_t,t,c_\text{neg})+s\,(\varepsilon_\theta(x_t,t,c)-\varepsilon_\theta(x_t,t,c_\text{neg}))$.
# The guidance direction becomes "from the negative towards the prompt": what the two share cancels, and
# whatever the negative says is pushed away from. Below, the same prompt and seeds with three negatives. When
# the negative differs from the prompt only in the shape (row 2), the guidance pushes on the shape — the rings
# keep their holes — and not at all on the colours, which are left to the conditional model alone. Row 3 shows
# how blunt the tool is: the two captions differ only in the ring's colour, yet the background, white in both,
# turns pink, and two rings close into dark squares. At $s=6$ the push along the difference of two captions
# reaches parts of the image the differing words do not name. (Green ring on white is one of the ten
# combinations held out of training, `ldm_scratch.data.HELDOUT`: the model composes it from parts it has seen.)

# %%
from ldm_scratch.data import HELDOUT

prompt = "a green ring on a white background"
assert ("ring", "green", "white") in HELDOUT
negatives = ["", "a green circle on a white background", "a red ring on a white background"]
rows = [pipe.txt2img(prompt, negative_prompt=negative, guidance_scale=6.0, num_images=4, steps=15, seed=3,
                     output_type="np", progress=False) for negative in negatives]
fig, axes = plt.subplots(len(negatives), 4, figsize=(8, 2.1 * len(negatives)))
for row, (negative, images) in enumerate(zip(negatives, rows)):
    for col, image in enumerate(images):
        axes[row, col].imshow(image); axes[row, col].set_xticks([]); axes[row, col].set_yticks([])
    label = negative[2:].replace(" on a ", "\non ") if negative else "(empty)"
    axes[row, 0].set_ylabel(f"negative:\n{label}", fontsize=7)
fig.suptitle(prompt); plt.show()

# %% [markdown]
# **On the official weights.** Everything here runs unchanged on Stable Diffusion v1.5 once you have the file
# (see `weights/README.md`): replace the model cell's `ldm_scratch.load_pipeline()` by
# `ldm_scratch.load_pipeline("weights/v1-5-pruned-emaonly.safetensors")`. Expect guidance 7.5 as the usual
# default; below 3 prompts are followed loosely, above 12–15 colours burn; negative prompts like "blurry, low
# quality" work because CLIP puts such words near the images that had them.
