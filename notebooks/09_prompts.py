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
# # 9. Prompts as people write them
#
# Most Stable Diffusion prompts are written for AUTOMATIC1111's web UI: `(word:1.3)` to stress a word, `[word]`
# to soften it, `BREAK` to start a new 75-token chunk, prompts far longer than CLIP's 77 positions, and
# `[cat:dog:0.5]` to change the prompt half-way through sampling. This notebook takes that syntax apart and
# measures what it does to the pictures of the bundled tiny model.
#
# The path of a prompt:
#
# 1. **schedule** — editing and alternation give one text per stretch of steps: `[(end_at_step, text)]`;
# 2. **weights** — each text splits into fragments with weights: `(x)` ×1.1, `[x]` ÷1.1, `(x:w)` ×w, nested
#    brackets multiply;
# 3. **chunks** — the fragments' tokens fill chunks of 75 (BOS + 75 + EOS = 77 positions each);
# 4. **CLIP + emphasis** — each chunk is encoded, $z\in\mathbb R^{77\times D}$, each token's vector is
#    multiplied by its weight, and the chunk is rescaled to keep its mean:
#    $$z' = (z\odot w)\cdot\frac{\operatorname{mean}(z)}{\operatorname{mean}(z\odot w)}$$
#    (the web UI's "Original" emphasis); the chunks are concatenated into a context $[1, 77k, D]$.
#
# * `ldm_scratch/prompts.py` — `schedule`, `parse_weights`, `chunks`
# * `ldm_scratch/conditioning.py` — `emphasize`, the per-step contexts, padding with empty chunks
# * `ldm_scratch/pipeline.py` — `encode_prompt`, `txt2img(..., prompt_syntax=, prompt_embeds=)`

# %%
# %matplotlib inline
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

import ldm_scratch
from ldm_scratch.data import checker
from ldm_scratch.prompts import parse_weights, prompt_chunks, schedule

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets: plain bars are fine
plt.rcParams["image.interpolation"] = "nearest"   # show 64² images as their pixels
torch.set_num_threads(1)                          # tiny tensors: one thread is as fast, and never stalls

pipe = ldm_scratch.load_pipeline()                # the bundled tiny model
tokenizer = pipe.tokenizer

# %% [markdown]
# ## 1. The parse of a weighted prompt
#
# The web UI's own example. Each `(` multiplies everything up to its `)` by 1.1 (or by the number after the
# colon), each `[` divides by 1.1, and the bracket left open at the start closes at the end, so it lifts the
# whole rest of the prompt: `house` gets 1.3 · 1.1 · 1.1 = 1.573, `sky` 1.1⁴ = 1.4641.

# %%
text = "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."
for fragment, weight in parse_weights(text):
    print(f"{weight:8.4f}  {fragment!r}")
assert parse_weights(text)[1] == ("house", 1.5730000000000004)     # the web UI's float, bit for bit

# %% [markdown]
# Each token inherits the weight of its fragment; BOS, EOS and the padding keep 1.0:

# %%
(chunk,) = prompt_chunks("a (red:1.5) [circle] on a blue background", tokenizer)
n = chunk.ids.index(tokenizer.eos_id) + 1
for token, weight in zip(chunk.ids[:n], chunk.weights[:n]):
    print(f"{weight:6.3f}  {tokenizer.decode([token])}")

# %% [markdown]
# ## 2. The chunks of a long prompt
#
# CLIP reads 77 positions; the web UI (and `prompt_syntax="a1111"`, the default here) reads any length in
# chunks of 75 tokens. When a chunk fills up and a comma lies within its last 20 tokens, everything after the
# comma moves to the next chunk, so a phrase is not cut in two. `BREAK` ends a chunk by hand.

# %%
long_prompt = ", ".join(["a red circle on a blue background"] * 9 + ["highly detailed and very sharp focus"])
print(len(tokenizer.encode(long_prompt)), "tokens")
for k, c in enumerate(prompt_chunks(long_prompt, tokenizer)):
    ids = [i for i in c.ids[1:] if i != tokenizer.eos_id]
    print(f"chunk {k}: {len(ids):2d} tokens, ends with …{tokenizer.decode(ids[-6:])!r}")

context, negative = pipe.encode_prompt(long_prompt)
print("context", tuple(context.shape), " negative (\"\" padded with empty chunks)", tuple(negative.shape))

# %% [markdown]
# Nine phrases of 7 tokens and their commas fill 72 positions; "highly detailed and" would fill the chunk to 75
# and cut the last phrase in two, so the whole phrase after the comma moves to chunk 1 (chunk 0 keeps 72 tokens).
#
# A prompt without brackets that fits in 75 tokens gives exactly the context CLIP gives for it, bit for bit — so
# the syntax costs nothing where it is not used:

# %%
plain = pipe.text_encoder(tokenizer(["a red circle on a blue background"]))
assert torch.equal(pipe.encode_prompt("a red circle on a blue background")[0], plain)

# %% [markdown]
# ## 3. The effect of one weight on the picture
#
# The tiny model knows six colours. Give the word "red" a weight $w$ in "a (red:w) circle on a blue background"
# and generate the same six seeds for each $w$. The pixel checker (`ldm_scratch.data.checker`) reads the colour
# of each shape; beside it, the mean "redness" $R - (G+B)/2$ of the shape's pixels (those far from the blue
# background). $w = 1/1.1$ is `[red]`, $w = 1.5$ is `(red:1.5)`.

# %%
weights = [0.0, 0.5, 1 / 1.1, 1.0, 1.5]
seeds = 6
blue = np.array([30, 70, 220])
rows, found = [], {}
for w in weights:
    images = pipe.txt2img(f"a (red:{w:.4f}) circle on a blue background", seed=0, num_images=seeds, steps=15,
                          progress=False, output_type="np") * 255
    shape = np.linalg.norm(images - blue, axis=-1) > 100                       # [N, H, W]: not background
    redness = np.mean([(im[..., 0] - (im[..., 1] + im[..., 2]) / 2)[m].mean() for im, m in zip(images, shape)])
    colours = [checker.check(im.round().astype(np.uint8)).colour for im in images]
    found[w] = (colours.count("red"), redness)
    rows.append(images)
    print(f"w = {w:.3f}: read as red {colours.count('red')}/{seeds}, redness {redness:6.1f}   {colours}")

fig, axes = plt.subplots(len(weights), seeds, figsize=(seeds * 1.2, len(weights) * 1.3))
for r, (w, images) in enumerate(zip(weights, rows)):
    for c in range(seeds):
        axes[r, c].imshow(images[c].round().astype(np.uint8))
        axes[r, c].axis("off")
    axes[r, 0].set_title(f"(red:{w:.2f})", fontsize=8, loc="left")
plt.tight_layout()
plt.show()

# %%
assert found[1.5][1] > found[1 / 1.1][1]            # (red:1.5) is redder than [red]
assert found[0.0][0] < found[1.0][0]                # weight 0 removes the word: the colour goes

# %% [markdown]
# At $w = 0$ the word's vector is zeroed (then the chunk rescaled) and the model falls back to the colour it
# draws when none is named; at 0.5 some seeds still come out red; from `[red]` up every seed is red, and
# `(red:1.5)` makes the red stronger than `[red]` does. Weights are not a dial with unlimited range: far above
# 1.5 the context leaves what CLIP ever produced and the tiny model's shapes start to break.
#
# ## 4. Prompt editing over the steps
#
# `[red:green:k]` uses "red" for the steps $i \le k$ and "green" after (the web UI counts the steps from 0 and
# switches after step $k$; a number with a "." is a fraction of the steps). The schedule for 15 steps:

# %%
print(schedule("a [red:green:0.4] circle on a blue background", 15))
print(schedule("a [red|green] circle on a blue background", 4))

# %% [markdown]
# The context changes at the right step. A callback records the x̂₀ the sampler predicts after each step, for
# `[red:green:7]` and for the plain red prompt, from the same seed: the two runs are identical for steps 0–7
# (the same context, the same numbers) and part from step 8, the first step with "green".

# %%
def x0_trajectory(prompt):
    seen = []
    pipe.txt2img(prompt, seed=3, steps=15, progress=False, output_type="latent",
                 callback=lambda i, t, x0_pred: seen.append(x0_pred.clone()))
    return torch.cat(seen)                                                   # [15, 4, 8, 8]


edited = x0_trajectory("a [red:green:7] circle on a blue background")
red = x0_trajectory("a red circle on a blue background")
difference = (edited - red).abs().flatten(1).amax(1)
print("max |x̂₀(edited) − x̂₀(red)| per step:", np.round(difference.numpy(), 3))
assert (difference[:8] == 0).all() and (difference[8:] > 0).all()

fig, axes = plt.subplots(2, 15, figsize=(15, 2.4))
for row, (name, latents) in enumerate((("[red:green:7]", edited), ("red", red))):
    frames = (pipe.decode_latents(latents) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for i, frame in enumerate(frames):
        axes[row, i].imshow(frame)
        axes[row, i].axis("off")
        axes[0, i].set_title(f"{i}", fontsize=8)
    axes[row, 0].text(-4, 32, name, ha="right", va="center", fontsize=8)
plt.show()

# %% [markdown]
# Where should the switch go? For each $k$, the final picture of `[red:green:k]` (same seed, 15 steps):

# %%
switches = [0, 4, 8, 11, 12, 13, 14]
images = np.concatenate([
    pipe.txt2img(f"a [red:green:{k}] circle on a blue background", seed=3, steps=15, progress=False,
                 output_type="np") for k in switches]) * 255
colours = [checker.check(im.round().astype(np.uint8)).colour for im in images]
fig, axes = plt.subplots(1, len(switches), figsize=(len(switches) * 1.4, 1.8))
for ax, k, im, colour in zip(axes, switches, images, colours):
    ax.imshow(im.round().astype(np.uint8))
    ax.set_title(f"k={k}\n{colour}", fontsize=8)
    ax.axis("off")
plt.tight_layout()
plt.show()
print(dict(zip(switches, colours)))

# %% [markdown]
# A measurement about this model, not about the syntax: the tiny model re-decides the colour in its very last
# steps. Only `k = 14`, which (counting from 0) keeps "red" for all 15 steps, ends red; "green" for the last step
# alone (k = 13) already turns the circle green. Large models fix the layout and colours much earlier, which is
# why web-UI users put switches at 0.3–0.6 of the steps; the tiny model's 64² images have little but colour
# and shape to decide, and its low-noise steps follow the prompt rather than the image.

# %% [markdown]
# ## 5. Prompt embeddings in and out
#
# `encode_prompt` returns the contexts the pipeline would use, and every pipeline call takes them back as
# `prompt_embeds=` / `negative_prompt_embeds=`, so a context can be edited by hand. The round trip is exact:

# %%
context, negative = pipe.encode_prompt("a (red:1.3) circle on a blue background", negative_prompt="green")
a = pipe.txt2img("a (red:1.3) circle on a blue background", negative_prompt="green", seed=1, steps=10,
                 progress=False, output_type="latent")
b = pipe.txt2img(prompt_embeds=context, negative_prompt_embeds=negative, seed=1, steps=10, progress=False,
                 output_type="latent")
assert torch.equal(a, b)
print("txt2img(prompt) == txt2img(prompt_embeds=encode_prompt(prompt)):", torch.equal(a, b))
