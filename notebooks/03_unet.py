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
# # 3. The UNet: $\varepsilon_\theta(x_t, t, c)$
#
# The denoiser takes a noisy latent $x_t$ `[B, 4, h, w]`, the timestep $t$ and the text context $c$
# `[B, 77, D]`, and predicts the noise $\hat\varepsilon$ `[B, 4, h, w]` (trained with eq 4.3,
# $\mathcal L=\mathbb E\|\varepsilon-\varepsilon_\theta(x_t,t,c)\|^2$).
#
# * `ldm_scratch/unet.py` — `timestep_embedding`, `ResBlock`, `SpatialTransformer` / `TransformerBlock`,
#   `Attention`, `DownLevel` / `Middle` / `UpLevel`, `UNet.forward`
#
# This notebook looks inside: the shapes at every level (with forward hooks), the timestep embedding, and the
# cross-attention maps that tie each prompt token to places in the image.

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
print(unet.config)
print(f"UNet: {sum(p.numel() for p in unet.parameters()):,} parameters")


# %% [markdown]
# ## Shapes through the levels
#
# A forward hook on every top-level part of the UNet records the shape of what comes out. The encoder half
# halves the resolution at the end of every level but the last (twice for the tiny model's three levels,
# three times for SD's four); the decoder half doubles it back, each ResBlock there taking one skip
# connection from the encoder (`UpLevel.forward`: `torch.cat([x, skips.pop()], dim=1)`).

# %%
def trace_shapes(model, x, t, context):
    rows, hooks = [], []
    parts = [("input_conv", model.input_conv)]
    parts += [(f"down.{i}", level) for i, level in enumerate(model.down)] + [("middle", model.middle)]
    parts += [(f"up.{i}", model.up[i]) for i in reversed(range(len(model.up)))]
    parts += [("output_conv", model.output_conv)]
    for name, module in parts:
        hooks.append(module.register_forward_hook(
            lambda m, args, out, name=name: rows.append((name, tuple(args[0].shape), tuple(out.shape)))))
    try:
        model(x, t, context)
    finally:
        for hook in hooks:
            hook.remove()
    for name, shape_in, shape_out in rows:
        print(f"{name:12s} {str(shape_in):22s} → {shape_out}")

h = config.image_size // vae.config.downsample_factor
context = text_encoder(tokenizer(["a red circle on a blue background"]))
trace_shapes(unet, torch.randn(1, unet.config.in_channels, h, h), torch.tensor([500]), context)

# %% [markdown]
# The same trace for the **full-size SD v1 UNet** (859,520,964 parameters), built on PyTorch's `meta` device:
# tensors there have shapes but no memory and no values, so this costs nothing — the shapes are exactly the
# table in `unet.py`'s docstring.

# %%
from ldm_scratch.unet import UNet, UNetConfig

with torch.device("meta"):
    full = UNet(UNetConfig())
    print(f"SD v1 UNet: {sum(p.numel() for p in full.parameters()):,} parameters")
    trace_shapes(full, torch.zeros(1, 4, 64, 64), torch.tensor([500]), torch.zeros(1, 77, 768))
del full

# %% [markdown]
# ## The timestep embedding
#
# `timestep_embedding(t, dim)`: $\text{emb}(t) = [\cos(t\,\omega_0),\dots,\cos(t\,\omega_{d/2-1}),
# \sin(t\,\omega_0),\dots]$ with $\omega_i=10000^{-i/(d/2)}$ — the Transformer's position code, with $t$ as the
# position. Low channels oscillate fast (they tell nearby $t$ apart), high channels slowly (they say roughly
# where in the schedule we are). An MLP (`TimestepMLP`) turns it into the vector every ResBlock adds as a
# per-channel bias.

# %%
from ldm_scratch.unet import timestep_embedding

ts = torch.arange(1000)
emb = timestep_embedding(ts, 320)                      # SD v1's size: [1000, 320]
fig, axes = plt.subplots(1, 3, figsize=(15, 3.4), dpi=72)         # low resolution: the stripes do not compress
axes[0].imshow(emb.T.numpy(), aspect="auto", cmap="RdBu_r", interpolation="antialiased")   # 1000 columns: smooth
axes[0].set_xlabel("t"); axes[0].set_ylabel("channel (cos half, then sin half)")
axes[0].set_title("timestep_embedding(t, 320)")
for ch in (0, 20, 60, 120):
    axes[1].plot(ts, emb[:, ch], label=f"channel {ch}")
axes[1].set_xlim(0, 200); axes[1].legend(fontsize=8); axes[1].set_xlabel("t"); axes[1].set_title("a few channels")
unit = torch.nn.functional.normalize(emb, dim=-1)
axes[2].imshow((unit @ unit.T).numpy(), cmap="viridis")
axes[2].set_title("cosine similarity emb(t)·emb(t')"); axes[2].set_xlabel("t'"); axes[2].set_ylabel("t")
plt.show()

# %% [markdown]
# ## Cross-attention maps: where does each word look?
#
# In every `TransformerBlock`, `cross_attn` lets each latent pixel (a query) attend to the 77 context vectors
# (keys and values):
#
# $$A = \text{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_\text{head}}}\right),\quad Q = x W_q\ [h\cdot w, C],\ \
#   K = c\,W_k\ [77, C],\qquad \text{out} = \text{to\_out}(A\,V).$$
#
# The attention function (`ldm_scratch/attention.py`) is PyTorch's fused SDPA, which never materialises $A$. To
# see it, a forward hook on each `cross_attn` module captures its inputs and recomputes $A$ from the module's own
# `to_q` / `to_k` weights — and checks that $A V$ reproduces the module's output, so the maps are the real
# ones. Column $j$ of $A$, reshaped to $h\times w$, is the map of token $j$; we average the heads.

# %%
from einops import rearrange
from ldm_scratch.tokenizer import CONTEXT_LENGTH
from ldm_scratch.unet import TransformerBlock

def record_cross_attention(model):
    maps, hooks = [], []
    def hook(module, args, output):
        x, context = args                                      # [B, h·w, C], [B, 77, D]
        n_heads = module.n_heads
        q = rearrange(module.to_q(x), "b n (h d) -> b h n d", h=n_heads)
        k = rearrange(module.to_k(context), "b m (h d) -> b h m d", h=n_heads)
        v = rearrange(module.to_v(context), "b m (h d) -> b h m d", h=n_heads)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)    # [B, heads, h·w, 77]
        again = module.to_out(rearrange(probs @ v, "b h n d -> b n (h d)"))
        torch.testing.assert_close(again, output, atol=1e-4, rtol=1e-4)               # the real attention
        maps.append(probs.mean(dim=1))                                                 # [B, h·w, 77]
    for block in model.modules():
        if isinstance(block, TransformerBlock):
            hooks.append(block.cross_attn.register_forward_hook(hook))
    return maps, hooks


# %% [markdown]
# Feed the UNet a real training image's latent, noised to $t=500$, with its caption, and look at the maps of
# the caption's tokens in the layers at the finest resolution that has attention (8×8 for the tiny model).
# Each panel is scaled on its own.

# %%
from ldm_scratch.data import render
from ldm_scratch.data.shapes import to_tensor

caption = "a red circle on a blue background"
image = to_tensor(render("circle", "red", "blue", size=config.image_size))[None]
z0 = vae.encode(image).mean * config.latent_scale
x_t = pipe.schedule.q_sample(z0, 500, torch.randn_like(z0))                # the model's own β schedule
ids = tokenizer([caption])

maps, hooks = record_cross_attention(unet)
try:
    unet(x_t, torch.tensor([500]), text_encoder(ids))
finally:
    for hook in hooks:
        hook.remove()
sides = [int(round(probs.shape[1] ** 0.5)) for probs in maps]
print(f"{len(maps)} cross-attention layers, in the order they run, at {' '.join(f'{s}²' for s in sides)}")

n_text = len(tokenizer.encode(caption))
labels = ["BOS"] + [tokenizer.decode([i]) for i in ids[0, 1:n_text + 1].tolist()] + ["EOS"]
finest = [k for k, side in enumerate(sides) if side == max(sides)]
fig, axes = plt.subplots(len(finest), len(labels) + 1, figsize=(1.3 * (len(labels) + 1), 1.45 * len(finest)))
for row, k in zip(axes, finest):
    grid = rearrange(maps[k][0], "(h w) m -> m h w", h=sides[k])                # [77, h, w]
    row[0].imshow(((image[0] + 1) / 2).permute(1, 2, 0).numpy())
    row[0].set_title(f"layer {k}", fontsize=9)
    for j, (ax, label) in enumerate(zip(row[1:], labels)):
        ax.imshow(grid[j].numpy(), cmap="inferno"); ax.set_title(label, fontsize=9)
for ax in axes.flat:
    ax.axis("off")
plt.show()

# %% [markdown]
# Every one of these layers attends differently on the circle and around it — the maps outline the shape —
# but which token lights up where changes from layer to layer: in one, "red" is bright on the circle, in
# another dark. The tiny text encoder is causal and only two blocks deep, so every token after "red" carries
# the colour too, and the UNet is free to read it from any of them. (In SD v1, with 16 layers and a 12-block
# encoder, the word maps are sharper and agree enough to be averaged over layers; prompt-to-prompt editing
# relies on that.)
#
# Where does the attention mass go? Share of each position, averaged over pixels, heads and all layers:

# %%
share = torch.stack([probs[0].mean(0) for probs in maps]).mean(0)             # [77]
for label, value in zip(labels, share[: len(labels)].tolist()):
    print(f"{label:12s} {value:6.3f}")
print(f"{'padding':12s} {share[len(labels):].sum():6.3f}  ({CONTEXT_LENGTH - len(labels)} positions after EOS)")

# %% [markdown]
# The text's own tokens get about a third of the attention, "red" and "circle" the most; the rest goes to the
# padding positions after EOS, which have read the whole prompt (notebook 1). In SD v1 most of the mass goes to
# BOS instead — the same vector for every prompt, a place to put attention that changes nothing.

# %% [markdown]
# **On the official weights.** Everything here runs unchanged on Stable Diffusion v1.5 once you have the file
# (see `weights/README.md`): replace the model cell's `ldm_scratch.load_pipeline()` by
# `ldm_scratch.load_pipeline("weights/v1-5-pruned-emaonly.safetensors")`. Expect `[1, 4, 64, 64]` latents, 16
# cross-attention layers at 64², 32², 16² and 8², and word maps that outline objects well enough for
# prompt-to-prompt editing (Hertz et al. 2022).
