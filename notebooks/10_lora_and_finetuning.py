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
# # 10. LoRA and fine-tuning: teaching the model a new word
#
# The bundled tiny model knows five shapes. Here it learns a sixth, **cross**, from 20 pictures, and we look at why
# LoRA works: the change fine-tuning makes to a weight matrix is close to low-rank.
#
# Fine-tuning minimises the same loss as training, $L = \mathbb E\,\|\varepsilon - \varepsilon_\theta(z_t, t, c)\|^2$,
# on the new pictures. The methods differ only in which numbers move:
#
# | method | trains | writes |
# |---|---|---|
# | DreamBooth | the whole UNet (+ text encoder) | a full model file |
# | LoRA (Hu et al. 2021) | $A \in \mathbb R^{r\times n}$, $B \in \mathbb R^{m\times r}$ beside a frozen $W_0$: $h = W_0x + \tfrac{\alpha}{r} B A x$ | a small LoRA file |
# | textual inversion (Gal et al. 2022) | the new word's rows of the token table | an embedding |
#
# $B$ starts at zero, so the first step sees exactly the base model (`ldm_scratch/training/lora_training.py`).

# %%
# %matplotlib inline
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import ldm_scratch
from ldm_scratch.data.checker import check
from ldm_scratch.data.shapes import caption, new_shape_combinations, render
from ldm_scratch.training.finetune import FinetuneConfig, finetune

torch.set_num_threads(1)                      # a tiny model: one thread is fastest on a shared machine
work = Path(tempfile.mkdtemp())
combos = new_shape_combinations()             # the 30 (cross, colour, background) triples
rng = np.random.default_rng(16)
order = rng.permutation(len(combos))
train, heldout = [combos[i] for i in order[:20]], [combos[i] for i in order[20:]]
(work / "data").mkdir()
for i, combo in enumerate(train):             # 20 pictures, each with its caption beside it
    render(*combo, size=64, rng=np.random.default_rng([16, i])).save(work / "data" / f"{i:02d}.png")
    (work / "data" / f"{i:02d}.txt").write_text(caption(*combo))
fig, axes = plt.subplots(1, 8, figsize=(8, 1.3))
for ax, i in zip(axes, range(8)):
    ax.imshow(plt.imread(work / "data" / f"{i:02d}.png"))
    ax.set_title(f"{train[i][1]} {train[i][0]}\non {train[i][2]}", fontsize=6)
    ax.axis("off")

# %% [markdown]
# ## The change fine-tuning makes is nearly low-rank
#
# A short full fine-tune (every UNet weight free, 40 steps) on the crosses, then the change of one weight matrix,
# $\Delta W = W_{\text{tuned}} - W_0$. Its singular values $\sigma_1 \ge \sigma_2 \ge \dots$ say how well rank $r$ can
# describe it: the best rank-$r$ approximation (Eckart–Young) keeps the first $r$ and leaves the relative error
#
# $$\frac{\|\Delta W - \Delta W_r\|_F}{\|\Delta W\|_F} = \sqrt{\frac{\sum_{i>r}\sigma_i^2}{\sum_i \sigma_i^2}}.$$
#
# A random matrix of the same shape is the comparison: its energy is spread over all singular values.

# %%
full = finetune(FinetuneConfig(method="dreambooth", data=str(work / "data"), out_dir=str(work / "full"), steps=40,
                               batch=8, lr=3e-4, checkpoint_every=0, progress=False))
base = ldm_scratch.load_pipeline(fast=False)
tuned = dict(full["pipe"].unet.named_parameters())
deltas = {name: (tuned[name] - w).detach() for name, w in base.unet.named_parameters()
          if w.dim() == 2 and min(w.shape) >= 32 and ("attn" in name or ".ff." in name)}   # the transformers


def relative_error(delta: torch.Tensor) -> np.ndarray:
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    return ((s2.sum() - s2.cumsum(0)).clamp(min=0) / s2.sum()).sqrt().numpy()


fig, ax = plt.subplots(figsize=(5, 2.8))
for name in list(deltas)[:6]:
    ax.plot(range(1, len(relative_error(deltas[name])) + 1), relative_error(deltas[name]), label=name, lw=1)
noise = torch.randn_like(deltas[name])
ax.plot(range(1, len(relative_error(noise)) + 1), relative_error(noise), "k--", label="random matrix")
ax.set_xlabel("rank r"), ax.set_ylabel("relative error of ΔW_r"), ax.set_xlim(1, 32), ax.legend(fontsize=6)
for name in list(deltas)[:3]:
    print(f"{name} {list(deltas[name].shape)}: rank 4 keeps {1 - relative_error(deltas[name])[3] ** 2:.0%} of ‖ΔW‖²")

# %% [markdown]
# ## A LoRA fine-tune, live
#
# `ldm-scratch finetune --method lora --data FOLDER` does this from the command line. Rank 8 on every layer of the
# UNet and the text encoder's attention and MLP; the file it writes is in the kohya layout the web UI and ComfyUI
# read, and `pipe.load_lora` loads it back (merging $W' = W_0 + \frac{\alpha}{r}BA$).

# %%
lora = finetune(FinetuneConfig(method="lora", data=str(work / "data"), out_dir=str(work / "lora"), steps=120,
                               batch=8, lr=3e-3, lora_rank=8, lora_targets="all", lora_text_encoder=True,
                               checkpoint_every=0, progress=False))
print(f"{lora['output'].name}: {lora['output'].stat().st_size / 1e3:.0f} kB in {lora['seconds']:.0f} s; loss "
      f"{np.mean(lora['loss'][:10]):.3f} → {np.mean(lora['loss'][-10:]):.3f}")
plt.figure(figsize=(4.5, 1.8)), plt.plot(lora["loss"], lw=0.8), plt.xlabel("step"), plt.ylabel("loss");

# %% [markdown]
# ## Before and after
#
# Prompts the model never saw with "cross" (held-out colour pairs), and two old prompts. The checker reads each
# picture; ✓ means shape, colour and background are all right.

# %%
prompts = [caption(*c) for c in heldout[:6]] + ["a red circle on a blue background", "a green star on a white background"]
expected = heldout[:6] + [("circle", "red", "blue"), ("star", "green", "white")]
after = ldm_scratch.load_pipeline(fast=False)
after.load_lora(lora["output"])
fig, axes = plt.subplots(2, len(prompts), figsize=(1.2 * len(prompts), 3.0))
for row, (label, pipe) in enumerate([("before", base), ("after LoRA", after)]):
    images = pipe.txt2img(prompts, steps=20, seed=0, output_type="np", progress=False)
    for ax, image, prompt, combo in zip(axes[row], images, prompts, expected):
        mark = "✓" if check(image, new_shapes=True).matches(*combo) else "✗"
        ax.imshow(image), ax.axis("off"), ax.set_title(f"{mark} {combo[1]} {combo[0]}\non {combo[2]}", fontsize=6)
    axes[row][0].text(-8, 32, label, rotation=90, va="center", ha="right", fontsize=8)
