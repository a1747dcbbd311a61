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
# # 1. The tokenizer and the text encoder
#
# Stable Diffusion reads a prompt in two steps:
#
# $$\text{prompt} \xrightarrow{\text{tokenizer}} \text{ids}\in\{0,\dots,49407\}^{77}
#   \xrightarrow{\text{CLIP text transformer}} c \in \mathbb{R}^{77\times 768}$$
#
# and the UNet cross-attends to the 77 vectors of $c$ at every denoising step.
#
# * `ldm_scratch/tokenizer.py` — `clean_text`, `pre_tokenize`, `CLIPTokenizer.bpe_steps`, `CLIPTokenizer.__call__`
# * `ldm_scratch/clip.py` — `CLIPTextModel.forward`
#
# Read the module docstrings beside this notebook: each cell below exercises one function of them.

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
from ldm_scratch.tokenizer import BOS_ID, CONTEXT_LENGTH, EOS_ID, bytes_to_unicode, clean_text, pre_tokenize

tok = ldm_scratch.load_tokenizer()     # OpenAI's merges, cached in ~/.cache/ldm_scratch after the first use
print(f"vocabulary: {len(tok):,} tokens = 2·256 byte tokens + {len(tok.ranks):,} merges + BOS + EOS")

# %% [markdown]
# ## From text to words
#
# `clean_text` runs `ftfy.fix_text`, unescapes HTML twice, collapses whitespace and lower-cases (as CLIP does);
# `pre_tokenize` cuts the text into words,
# single digits and runs of symbols with CLIP's pattern. BPE then works inside each word separately.

# %%
prompt = "A Lighthouse on a cliff at sunset, 4K &amp; ultra-detailed!"
cleaned = clean_text(prompt)
words = pre_tokenize(cleaned)
print(repr(cleaned))
print(words)


# %% [markdown]
# ## Byte-pair encoding, one merge at a time
#
# A word starts as its UTF-8 bytes, each shown as a printable character (`bytes_to_unicode`), with the
# end-of-word marker `</w>` on the last one. BPE then repeatedly merges the adjacent pair with the **lowest
# rank** in OpenAI's merge list (rank 0 was the most frequent pair when the list was learned), until no adjacent
# pair is in the list. `CLIPTokenizer.bpe_steps(word)` returns every intermediate state:

# %%
def show_bpe(word):
    for step in tok.bpe_steps(word):
        what = "start" if step.pair is None else f"merge {step.pair[0]!r} + {step.pair[1]!r}  (rank {step.rank:,})"
        print(f"{what:44s} → {' · '.join(step.symbols)}")
    print()

for word in ("lighthouse", "ultra", "4"):
    show_bpe(word)

# %% [markdown]
# Common words end as one token; rare ones stay in pieces. Non-ASCII text works because BPE runs on bytes:
# "é" is two bytes, shown as `Ã©`, and an emoji is four.

# %%
byte_char = bytes_to_unicode()
for word in ("café", "🦊"):
    print(word, "→ bytes", list(word.encode()), "→", "".join(byte_char[b] for b in word.encode()))
    show_bpe(word)

# %% [markdown]
# A picture of the same thing for every word of the prompt: the rank of each merge, in the order BPE applies
# them. Each merge joins two pieces, so a word of $n$ characters takes at most $n-1$ of them; what differs is
# which. The first merges are the most frequent pairs (ranks in the tens: `th`, `ou`), and a few late, rare
# merges (ranks in the thousands) finish the words.

# %%
fig, ax = plt.subplots(figsize=(8, 3.2))
for word in dict.fromkeys(words):                      # each word once, in prompt order
    merges = tok.bpe_steps(word)[1:]                   # step 0 is the start: no merge yet
    if merges:
        ax.plot(range(1, len(merges) + 1), [step.rank for step in merges], marker="o", label=word)
ax.set_yscale("log")
ax.set_xlabel("merge step"); ax.set_ylabel("rank of the merge (log)"); ax.legend(ncol=3, fontsize=8)
ax.set_title("BPE: frequent pairs merge first, rare ones finish the word")
plt.show()

# %% [markdown]
# ## Ids, special tokens and padding
#
# The token strings map to ids through the vocabulary; `encode` gives the ids without specials, `decode`
# inverts it (lower-cased, words re-joined with spaces). Calling the tokenizer on a batch of prompts gives the
# `[B, 77]` tensor CLIP reads: `<|startoftext|>` (49406), the ids, `<|endoftext|>` (49407), then padding —
# SD v1 pads with 49407 too.

# %%
print(tok.tokenize(prompt))
ids = tok.encode(prompt)
print(ids)
print(repr(tok.decode(ids)))

prompts = ["a red circle on a blue background", prompt, "fox"]
batch = tok(prompts)
print(batch.shape, batch.dtype)
print(batch[0, :12].tolist(), "…")

# %%
kind = np.full(batch.shape, 1)                                           # 1: a word piece
kind[batch == EOS_ID] = 3                                                # 3: padding (EOS repeated)
kind[torch.arange(len(prompts)), (batch == EOS_ID).int().argmax(1)] = 2  # 2: the first EOS ends the text
kind[:, 0] = 0                                                           # 0: BOS
fig, ax = plt.subplots(figsize=(11, 1.6))
ax.imshow(kind, cmap=plt.matplotlib.colors.ListedColormap(["tab:green", "tab:blue", "tab:red", "0.85"]),
          aspect="auto", vmin=0, vmax=3)
ax.set_yticks(range(len(prompts)), [p[:28] for p in prompts], fontsize=8)
ax.set_xlabel("position (0 … 76)")
ax.set_title("green BOS · blue word pieces · red EOS · grey padding (EOS again)")
plt.show()

# %% [markdown]
# ## The 77-token limit
#
# CLIP has 77 learned position embeddings, so a prompt keeps at most 75 ids between BOS and EOS. A longer
# prompt is cut to its first 75 ids, still ends with EOS (every text CLIP saw in training did), and the
# tokenizer warns with the words it dropped.

# %%
long_prompt = ", ".join(["a very detailed oil painting of a lighthouse"] * 12)
print(len(tok.encode(long_prompt)), "ids")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cut = tok(long_prompt)
print(caught[0].message)
print(cut.shape, "ends with", cut[0, -3:].tolist())
assert cut.shape == (1, CONTEXT_LENGTH) and cut[0, 0] == BOS_ID and cut[0, -1] == EOS_ID

# %% [markdown]
# ## The text encoder: ids → one vector per position
#
# `ldm_scratch/clip.py`, `CLIPTextModel.forward`: a causal (GPT-style) pre-LayerNorm transformer,
#
# $$h^0_i = E_{\text{tok}}[\text{id}_i] + E_{\text{pos}}[i],\qquad
#   h^{l} = h^{l-1} + \text{Attn}(\text{LN}(h^{l-1})) + \text{MLP}(\ldots),\qquad c = \text{LN}_{\text{final}}(h^L).$$
#
# SD uses the **whole last hidden state** $c\in\mathbb{R}^{77\times D}$ (D = 768 for SD v1; the tiny model is
# narrower), not CLIP's single pooled vector. Below: the text encoder of the bundled tiny model.

# %%
pipe = ldm_scratch.load_pipeline()      # the bundled tiny model, ldm_scratch/bundled/ (13 MB)
config, tokenizer, text_encoder, unet, vae = pipe.config, pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
for module in (text_encoder, unet, vae):
    module.eval().requires_grad_(False)   # inference only: no gradients to keep
print(f"{config.name}: {config.image_size}² images, "
      f"latents {config.latent_channels}×{config.image_size // config.vae.downsample_factor}², "
      f"latent scale {config.latent_scale:.4f}")

# %%
context = text_encoder(tokenizer(prompts))
print("context:", tuple(context.shape), "  token table E_tok:", tuple(text_encoder.token_embedding.weight.shape),
      "  position table E_pos:", tuple(text_encoder.position_embedding.weight.shape))
print(f"text encoder: {sum(p.numel() for p in text_encoder.parameters()):,} parameters "
      f"({text_encoder.config.n_layers} blocks, width {text_encoder.config.width})")

# %% [markdown]
# ### Causality: a token only sees the tokens before it
#
# The attention mask is $M_{ij}=-\infty$ for $j>i$. Change one word, and only the positions from that word on
# change — including every padding position after the text, which is why the padding vectors are not empty:
# they have read the whole prompt, and the UNet attends to them too.

# %%
pair = ["a red circle on a blue background", "a red square on a blue background"]
ids = tokenizer(pair)
c = text_encoder(ids)
change = (c[0] - c[1]).norm(dim=-1)                 # [77]
first = int((ids[0] != ids[1]).int().argmax())
fig, ax = plt.subplots(figsize=(9, 2.6))
ax.bar(range(CONTEXT_LENGTH), change.numpy())
ax.axvline(first - 0.5, color="r", ls="--", label=f"first differing token (position {first})")
ax.set_xlabel("position"); ax.set_ylabel("‖c₁ − c₂‖"); ax.legend()
plt.show()
assert torch.all(change[:first] == 0) and torch.all(change[first:] > 0)

# %% [markdown]
# ### How similar are the vectors?
#
# Cosine similarity between the output vectors of one prompt's positions. EOS and the padding after it are
# close to one another: each has read the whole prompt. Position 0 (BOS) sees only itself, so it is the same
# vector for every prompt (the assert above checked it for the two prompts there): the UNet gets one
# prompt-independent key it can attend to when no word is relevant.

# %%
ids = tokenizer(pair[:1])
n = int((ids[0] == EOS_ID).int().argmax()) + 3          # the text, its EOS and two padding positions
vectors = torch.nn.functional.normalize(text_encoder(ids)[0, :n], dim=-1)
labels = [tokenizer.decode([i]) or "·" for i in ids[0, :n].tolist()]
labels[0], labels[n - 3:] = "BOS", ["EOS", "pad", "pad"]
fig, ax = plt.subplots(figsize=(5, 4))
im = ax.imshow((vectors @ vectors.T).numpy(), cmap="viridis")
ax.set_xticks(range(n), labels, rotation=60, fontsize=8); ax.set_yticks(range(n), labels, fontsize=8)
fig.colorbar(im); ax.set_title("cosine similarity of output vectors")
plt.show()

# %% [markdown]
# ### `clip_skip`
#
# `text_encoder(ids, clip_skip=k)` stops $k$ blocks early (still applying the final LayerNorm): diffusers'
# convention; AUTOMATIC1111's "Clip skip 2" is `clip_skip=1`.

# %%
ids = tokenizer(pair[:1])
for k in range(text_encoder.config.n_layers):
    diff = (text_encoder(ids, clip_skip=k) - text_encoder(ids)).abs().mean()
    print(f"clip_skip={k}: mean |difference| from the normal output {diff:.4f}")

# %% [markdown]
# **On the official weights.** Everything here runs unchanged on Stable Diffusion v1.5 once you have the file
# (see `weights/README.md`): replace the model cell's `ldm_scratch.load_pipeline()` by
# `ldm_scratch.load_pipeline("weights/v1-5-pruned-emaonly.safetensors")`. Expect a `[B, 77, 768]` context from a
# 123M-parameter encoder with 12 blocks; the tokenizer is the same.
