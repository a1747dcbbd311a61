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
# # 14. Fast on a CPU: bfloat16, attention in blocks, LCM, TAESD, DeepCache
#
# A 512² image at the default 30 steps takes minutes on a laptop's CPU. This notebook looks at what
# `ldm_scratch/fast/` and the LCM sampler do about it, each on something small enough to run here in seconds:
#
# * **bfloat16**: the bundled tiny model's pictures in float32 and in bfloat16, and what changes;
# * **attention in blocks of queries** (`fast/attention_blocks.py`): why three plain operations beat PyTorch's
#   fused kernel in bfloat16, timed at SD's own shape, and what rounding the scores costs;
# * **LCM** (`samplers/lcm.py`): the consistency function's c_skip and c_out, and the 4 timesteps it visits;
# * **TAESD** (`fast/taesd.py`): how much smaller than the KL autoencoder it is;
# * **DeepCache** (`fast/deepcache.py`): the tiny model's pictures when most steps reuse the deep features.
#
# The times at full size, against diffusers, are in the README ("Fast on a CPU", "Performance against diffusers");
# they come from `scripts/benchmark.py` and `scripts/seconds_to_image.py`, not from here. Timings printed below
# are from whichever machine ran the notebook last.

# %%
# %matplotlib inline
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import ldm_scratch
from ldm_scratch.data import HELDOUT, caption, check
from ldm_scratch.fast.attention_blocks import blocked_attention, query_rows
from ldm_scratch.fast.taesd import TAESD
from ldm_scratch.samplers.lcm import LCM, consistency_scalings
from ldm_scratch.vae import VAE, VAEConfig

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets: plain bars are fine
plt.rcParams["image.interpolation"] = "nearest"   # show 64² images as their pixels (smoothing would blur them)
torch.manual_seed(0)


def show_row(axes, images, titles):
    for ax, image, title in zip(axes, images, titles):
        ax.imshow(np.clip(image, 0, 1))
        ax.set_title(title, fontsize=8)
        ax.axis("off")


# %% [markdown]
# ## bfloat16: the same pictures, rounded
#
# bfloat16 keeps float32's 8 exponent bits and 8 of its 24 mantissa bits, so a CPU with bfloat16 dot products
# (AVX-512 BF16, AMX, ARM's BF16) multiplies its matrices at twice the float32 rate or more, and nothing overflows.
# `load_pipeline(dtype=torch.bfloat16)` puts the three networks in bfloat16; the sampler's $x_t$ and the guidance
# $\hat\varepsilon_\varnothing + w(\hat\varepsilon_c-\hat\varepsilon_\varnothing)$ stay float32 (30 small updates
# would round away in 8 bits). Four held-out prompts, the same seeds:

# %%
pipe32 = ldm_scratch.load_pipeline()
pipe16 = ldm_scratch.load_pipeline(dtype=torch.bfloat16)
combos = list(HELDOUT[:4])
prompts = [caption(*c) for c in combos]
with torch.inference_mode():
    full = pipe32.txt2img(prompts, seed=0, output_type="np", progress=False)
    half = pipe16.txt2img(prompts, seed=0, output_type="np", progress=False)

fig, axes = plt.subplots(3, 4, figsize=(10, 7.8))
show_row(axes[0], full, [f"float32\n{p}" for p in prompts])
show_row(axes[1], half, ["bfloat16"] * 4)
diff = np.abs(full - half)
show_row(axes[2], diff * 10, [f"|difference| × 10, mean {d.mean() * 255:.2f} levels" for d in diff])
plt.tight_layout()
plt.show()
for combo, a, b in zip(combos, full, half):
    print(f"{caption(*combo):45s} float32 reads {check(a).as_tuple()}, bfloat16 reads {check(b).as_tuple()}")

# %% [markdown]
# Over all 150 captions × 2 seeds (`scripts/bf16_error.py`, `docs/bf16_tiny.json`) the mean difference is 0.73
# levels of 255 and the checker's accuracy is the same in both (94.0 % and 94.3 %): bfloat16 changes pixels at the
# edges of shapes, not what is drawn.

# %% [markdown]
# ## Attention in blocks of queries
#
# At 512² the UNet's first level has 4096 tokens, and each of its five self-attention layers computes, per head,
#
# $$\mathrm{Attention}(Q,K,V)=\mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d}}\right)V,\qquad
# Q,K,V\in\mathbb{R}^{4096\times 40}.$$
#
# PyTorch's fused (flash) kernel never stores the 4096 × 4096 scores, but with 40-channel heads its inner matrix
# products are small tiles and it runs no faster in bfloat16 than in float32. Row $i$ of the output depends on
# row $i$ of $Q$ alone, so the same function can be computed for a block $Q_b$ of queries at a time:
#
# $$S=\tfrac{1}{\sqrt d}\,Q_bK^\top,\qquad P=\mathrm{softmax}(S),\qquad O_b=PV,$$
#
# two large matrix products that run at the machine's bfloat16 rate. The block is as tall as keeps $S$ within
# 4 MiB, so the same memory serves every block and stays in the cache:

# %%
for n in (4096, 1024, 256):
    print(f"{n} keys: {query_rows(n, n)} queries a block ({query_rows(n, n) * n * 2 / 2**20:.1f} MiB of scores)")

# %% [markdown]
# Both ways at SD v1's three self-attention shapes with classifier-free guidance ([2, 8 heads, N, d]), bfloat16,
# random q, k, v (medians of 3 calls). On a machine busy with other work the blocks lose their lead (README: each
# block is three short operations whose two threads wait for each other), so read these on a quiet one:

# %%
def median_time(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


rows = []
for n, d in ((4096, 40), (1024, 80), (256, 160)):
    q, k, v = (torch.randn(2, n, 8 * d).bfloat16() for _ in range(3))
    heads = [x.unflatten(-1, (8, d)).transpose(1, 2) for x in (q, k, v)]      # [B, 8, N, d] views
    kernel = median_time(lambda: F.scaled_dot_product_attention(*heads))
    blocks = median_time(lambda: blocked_attention(q, k, v, n_heads=8))
    rows.append((f"N = {n}, d = {d}", kernel, blocks))
    print(f"N = {n:4d}, d = {d:3d}: fused kernel {kernel * 1e3:6.1f} ms, blocks {blocks * 1e3:6.1f} ms "
          f"(blocks / kernel = {blocks / kernel:.2f})")

fig, ax = plt.subplots(figsize=(6, 2.8))
x = np.arange(len(rows))
ax.bar(x - 0.2, [r[1] * 1e3 for r in rows], 0.4, label="fused kernel")
ax.bar(x + 0.2, [r[2] * 1e3 for r in rows], 0.4, label="blocks of queries")
ax.set_xticks(x, [r[0] for r in rows])
ax.set_ylabel("ms per layer")
ax.set_yscale("log")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# **What it costs.** The kernel keeps $S$ in float32 until the softmax; the blocks round it to bfloat16 first,
# which moves a score $s$ by up to $|s|\cdot2^{-8}$, so the error grows with the scores' size. Against float32
# attention on the same bfloat16 q, k, v, scaling q to make the scores larger:

# %%
g = torch.Generator().manual_seed(0)
q0 = torch.randn(1, 1024, 8 * 40, generator=g)
k, v = (torch.randn(1, 1024, 8 * 40, generator=g).bfloat16() for _ in range(2))
scales, errors = [0.5, 1, 2, 4], {"fused kernel": [], "blocks": []}
largest = []
for c in scales:
    q = (c * q0).bfloat16()
    split = [x.unflatten(-1, (8, 40)).transpose(1, 2) for x in (q, k, v)]
    exact = F.scaled_dot_product_attention(*[x.float() for x in split]).transpose(1, 2).flatten(-2)
    kernel = F.scaled_dot_product_attention(*split).transpose(1, 2).flatten(-2).float()
    blocks = blocked_attention(q, k, v, n_heads=8).float()
    errors["fused kernel"].append((kernel - exact).abs().mean().item())
    errors["blocks"].append((blocks - exact).abs().mean().item())
    largest.append((split[0].float() @ split[1].float().transpose(-1, -2)).abs().max().item() / 40 ** 0.5)

fig, ax = plt.subplots(figsize=(6, 2.8))
for name, e in errors.items():
    ax.plot(largest, e, "o-", label=name)
ax.set_xlabel("largest |score| = |q·k|/√d")
ax.set_ylabel("mean |error| of the output")
ax.set_yscale("log")
ax.legend()
plt.tight_layout()
plt.show()
print("output std:", round(exact.std().item(), 3))

# %% [markdown]
# In the UNet this rounding is lost among the rest: q and k are themselves bfloat16 when they leave $W_q$ and $W_k$.
# Measured on the full-size UNet (`scripts/attention_blocks.py`), the relative error of $\hat\varepsilon$ in
# bfloat16 against float32 was 0.0174 with the kernel and 0.0173 with the blocks, and the 512² picture after 30
# steps moved by 1.20 levels on average against float32 (kernel: 1.2). The whole bfloat16 UNet step became ≈ 0.77×
# as long, and 0.59–0.64× diffusers' bfloat16 step (README). Only the CPU, only bfloat16, and only layers with at
# least 256 keys take the blocks; cross-attention's 77 keys keep the kernel, which is as fast there.

# %% [markdown]
# ## LCM: four steps instead of thirty
#
# A latent consistency model is SD distilled so that one call maps any $x_\tau$ to the start of its trajectory
# (Luo et al. 2023). The network's $\hat x_0$ is mixed with $x_\tau$ so that $f(x, 0)=x$ holds by construction:
#
# $$f(x_\tau,\tau)=c_\text{skip}(\tau)\,x_\tau+c_\text{out}(\tau)\,\hat x_0,\qquad
# c_\text{skip}=\frac{\sigma_d^2}{(s\tau)^2+\sigma_d^2},\quad c_\text{out}=\frac{s\tau}{\sqrt{(s\tau)^2+\sigma_d^2}}$$
#
# with $\sigma_d=0.5$ and $s=10$. Between calls the multistep sampler noises $f$ back to the next, lower $\tau$.

# %%
taus = np.arange(0, 1000)
skip_out = np.array([consistency_scalings(float(t)) for t in taus])
fig, axes = plt.subplots(1, 2, figsize=(11, 2.8))
for ax, span in zip(axes, (slice(0, 1000), slice(0, 10))):
    ax.plot(taus[span], skip_out[span, 0], label=r"$c_\mathrm{skip}$")
    ax.plot(taus[span], skip_out[span, 1], label=r"$c_\mathrm{out}$")
    ax.set_xlabel(r"$\tau$")
    ax.legend()
axes[0].set_title("over the whole schedule: f ≈ x̂₀ from τ ≈ 1 on")
axes[1].set_title("near τ = 0, where the boundary condition holds")
plt.tight_layout()
plt.show()
print("the 4 timesteps LCM visits:", LCM().timesteps(4), "(from its 50-step distillation grid 999, 979, …, 19)")

# %% [markdown]
# It needs LCM weights: an LCM-LoRA merged into your SD 1.5 model, or a full LCM UNet (README "Four steps instead
# of thirty"). The bundled tiny model was not distilled, so no picture here.

# %% [markdown]
# ## TAESD: a decoder a fraction of the size
#
# TAESD is a small autoencoder distilled to SD's latent space: plain 3×3 convolutions, no attention, no GroupNorm.
# It decodes latents already multiplied by the latent scale 0.18215 and outputs [0, 1]; `TAESD.decode` takes care
# of both so it can stand in for `pipe.vae` (`--vae PATH`). Parameter counts of the two decoders (random weights;
# the official files load with `load_taesd`):

# %%
kl_vae, taesd = VAE(VAEConfig()), TAESD()
count = lambda module: sum(p.numel() for p in module.parameters())      # noqa: E731
print(f"KL-VAE decoder {count(kl_vae.decoder) / 1e6:.1f} M parameters, TAESD decoder "
      f"{count(taesd.decoder) / 1e6:.2f} M")
z = torch.randn(1, 4, 32, 32)
with torch.inference_mode():
    kl_time, tiny_time = (median_time(lambda: model.decode(z), repeats=1) for model in (kl_vae, taesd))
print(f"a 256² decode: KL-VAE {kl_time:.2f} s, TAESD {tiny_time:.3f} s")
del kl_vae

# %% [markdown]
# ## DeepCache: the deep features, reused
#
# The UNet's deep features change little between neighbouring steps. With `deepcache_interval=N`, every N-th step
# runs the whole UNet and keeps the decoder's input where the shallow branch takes over; the steps between run only
# that branch. The tiny model's pictures with N = 2 and 3 (same prompts and seeds as above):

# %%
with torch.inference_mode():
    cached = {n: pipe32.txt2img(prompts, seed=0, output_type="np", progress=False, deepcache_interval=n)
              for n in (2, 3)}
fig, axes = plt.subplots(3, 4, figsize=(10, 7.8))
show_row(axes[0], full, [f"plain\n{p}" for p in prompts])
for row, n in zip(axes[1:], (2, 3)):
    show_row(row, cached[n], [f"DeepCache N = {n}: {'ok' if check(im).matches(*c) else 'misread'}"
                              for im, c in zip(cached[n], combos)])
plt.tight_layout()
plt.show()

# %% [markdown]
# On this small model DeepCache costs a lot of accuracy (README: 95 % → 82.5 % of held-out pictures right at
# N = 2, 52.5 % at N = 3; `scripts/fast_quality.py`): its UNet has 3 levels on an 8 × 8 latent, and the cached
# features change more from step to step than a full-size model's. At full size, N = 3 made the whole 512² image
# 2.4× faster. Start with N = 2 and look at the pictures.
