"""Write the teaching notebooks in `notebooks/` from the cell lists below (the .ipynb files are generated: edit here).

    python scripts/build_notebooks.py            # (re)write notebooks/*.ipynb, without outputs
    python scripts/build_notebooks.py --check    # exit 1 if a committed notebook differs from what this writes

Each notebook imports the package (never a copy of its code), names the file and function it explains, and runs
top to bottom in well under two minutes on a laptop CPU: it uses the bundled tiny model
(`weights/tiny-shapes.safetensors`) when present and otherwise tiny random networks of the same design.
`tests/test_notebooks.py` executes every notebook; `scripts/check_notebooks.py` checks that the committed files
carry no outputs and no machine paths.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def md(text: str) -> tuple[str, str]:
    return "markdown", textwrap.dedent(text).strip("\n")


def code(text: str) -> tuple[str, str]:
    return "code", textwrap.dedent(text).strip("\n")


# ---------------------------------------------------------------------------------------------------------------
# Cells several notebooks share (each notebook still contains its own copy: notebooks stand alone)
# ---------------------------------------------------------------------------------------------------------------

SETUP = code("""
    %matplotlib inline
    import warnings

    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    import ldm_scratch

    warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets: plain bars are fine
    torch.manual_seed(0)
    # The tensors here are tiny: one thread is as fast as two, and never stalls when another program wants a core.
    torch.set_num_threads(1)
""")

LOAD_MODEL = code('''
    from ldm_scratch.checkpoint import CheckpointError
    from ldm_scratch.clip import CLIPTextModel
    from ldm_scratch.configs import tiny_config
    from ldm_scratch.pipeline import StableDiffusion
    from ldm_scratch.unet import UNet
    from ldm_scratch.vae import VAE

    try:
        pipe = ldm_scratch.load_pipeline()     # the bundled tiny model, weights/tiny-shapes.safetensors
        trained = True
    except CheckpointError as error:           # not there: random networks of the same size, same code paths
        print(f"{error}\\n→ using random networks of the tiny model's size (pictures will be noise)")
        config = tiny_config()
        torch.manual_seed(0)
        pipe = StableDiffusion(CLIPTextModel(config.text_encoder), UNet(config.unet), VAE(config.vae), config)
        trained = False
    config, tokenizer, text_encoder, unet, vae = pipe.config, pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    for module in (text_encoder, unet, vae):
        module.eval().requires_grad_(False)
    print(f"{config.name}: {'trained' if trained else 'random weights'}, {config.image_size}² images, "
          f"latents {config.latent_channels}×{config.image_size // config.vae.downsample_factor}², "
          f"latent scale {config.latent_scale:.4f}")
''')

OFFICIAL = md("""
    **On the official weights.** Everything here runs unchanged on Stable Diffusion v1.5 once you have the file
    (see `weights/README.md`): replace the model cell's `ldm_scratch.load_pipeline()` by
    `ldm_scratch.load_pipeline("weights/v1-5-pruned-emaonly.safetensors")`. Expect {what}.
""")


def official(what: str) -> tuple[str, str]:
    kind, text = OFFICIAL
    return kind, text.replace("{what}", what)


# ---------------------------------------------------------------------------------------------------------------
# 01 — tokenizer and text encoder
# ---------------------------------------------------------------------------------------------------------------

NB01 = [
    md(r"""
    # 1. The tokenizer and the text encoder

    Stable Diffusion reads a prompt in two steps:

    $$\text{prompt} \xrightarrow{\text{tokenizer}} \text{ids}\in\{0,\dots,49407\}^{77}
      \xrightarrow{\text{CLIP text transformer}} c \in \mathbb{R}^{77\times 768}$$

    and the UNet cross-attends to the 77 vectors of $c$ at every denoising step.

    * `ldm_scratch/tokenizer.py` — `clean_text`, `pre_tokenize`, `CLIPTokenizer.bpe_steps`, `CLIPTokenizer.__call__`
    * `ldm_scratch/clip.py` — `CLIPTextModel.forward`

    Read the module docstrings beside this notebook: each cell below exercises one function of them.
    """),
    SETUP,
    code("""
    from ldm_scratch.tokenizer import BOS_ID, CONTEXT_LENGTH, EOS_ID, bytes_to_unicode, clean_text, pre_tokenize

    tok = ldm_scratch.load_tokenizer()     # OpenAI's merges, cached in ~/.cache/ldm_scratch after the first use
    print(f"vocabulary: {len(tok):,} tokens = 2·256 byte tokens + {len(tok.ranks):,} merges + BOS + EOS")
    """),
    md(r"""
    ## From text to words

    `clean_text` unescapes HTML, collapses whitespace and lower-cases; `pre_tokenize` cuts the text into words,
    single digits and runs of symbols with CLIP's pattern. BPE then works inside each word separately.
    """),
    code("""
    prompt = "A Lighthouse on a cliff at sunset, 4K &amp; ultra-detailed!"
    cleaned = clean_text(prompt)
    words = pre_tokenize(cleaned)
    print(repr(cleaned))
    print(words)
    """),
    md(r"""
    ## Byte-pair encoding, one merge at a time

    A word starts as its UTF-8 bytes, each shown as a printable character (`bytes_to_unicode`), with the
    end-of-word marker `</w>` on the last one. BPE then repeatedly merges the adjacent pair with the **lowest
    rank** in OpenAI's merge list (rank 0 was the most frequent pair when the list was learned), until no adjacent
    pair is in the list. `CLIPTokenizer.bpe_steps(word)` returns every intermediate state:
    """),
    code("""
    def show_bpe(word):
        for step in tok.bpe_steps(word):
            what = "start" if step.pair is None else f"merge {step.pair[0]!r} + {step.pair[1]!r}  (rank {step.rank:,})"
            print(f"{what:44s} → {' · '.join(step.symbols)}")
        print()

    for word in ("lighthouse", "ultra", "4"):
        show_bpe(word)
    """),
    md(r"""
    Common words end as one token; rare ones stay in pieces. Non-ASCII text works because BPE runs on bytes:
    "é" is two bytes, shown as `Ã©`, and an emoji is four.
    """),
    code("""
    byte_char = bytes_to_unicode()
    for word in ("café", "🦊"):
        print(word, "→ bytes", list(word.encode()), "→", "".join(byte_char[b] for b in word.encode()))
        show_bpe(word)
    """),
    md(r"""
    A picture of the same thing for every word of the prompt: how many pieces each word is in after each merge.
    Most of the work is done by the first, most frequent merges; a handful of late, rare merges finish the words.
    """),
    code("""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for word in words:
        steps = tok.bpe_steps(word)
        ax.plot(range(len(steps)), [len(s.symbols) for s in steps], marker="o", label=word)
    ax.set_xlabel("merge step"); ax.set_ylabel("pieces in the word"); ax.legend(ncol=4, fontsize=8)
    ax.set_title("BPE: pieces per word after each merge")
    plt.show()
    """),
    md(r"""
    ## Ids, special tokens and padding

    The token strings map to ids through the vocabulary; `encode` gives the ids without specials, `decode`
    inverts it (lower-cased, words re-joined with spaces). Calling the tokenizer on a batch of prompts gives the
    `[B, 77]` tensor CLIP reads: `<|startoftext|>` (49406), the ids, `<|endoftext|>` (49407), then padding —
    SD v1 pads with 49407 too.
    """),
    code("""
    print(tok.tokenize(prompt))
    ids = tok.encode(prompt)
    print(ids)
    print(repr(tok.decode(ids)))

    prompts = ["a red circle on a blue background", prompt, "fox"]
    batch = tok(prompts)
    print(batch.shape, batch.dtype)
    print(batch[0, :12].tolist(), "…")
    """),
    code("""
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
    """),
    md(r"""
    ## The 77-token limit

    CLIP has 77 learned position embeddings, so a prompt keeps at most 75 ids between BOS and EOS. A longer
    prompt is cut to its first 75 ids, still ends with EOS (every text CLIP saw in training did), and the
    tokenizer warns with the words it dropped.
    """),
    code("""
    long_prompt = ", ".join(["a very detailed oil painting of a lighthouse"] * 12)
    print(len(tok.encode(long_prompt)), "ids")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut = tok(long_prompt)
    print(caught[0].message)
    print(cut.shape, "ends with", cut[0, -3:].tolist())
    assert cut.shape == (1, CONTEXT_LENGTH) and cut[0, 0] == BOS_ID and cut[0, -1] == EOS_ID
    """),
    md(r"""
    ## The text encoder: ids → one vector per position

    `ldm_scratch/clip.py`, `CLIPTextModel.forward`: a causal (GPT-style) pre-LayerNorm transformer,

    $$h^0_i = E_{\text{tok}}[\text{id}_i] + E_{\text{pos}}[i],\qquad
      h^{l} = h^{l-1} + \text{Attn}(\text{LN}(h^{l-1})) + \text{MLP}(\ldots),\qquad c = \text{LN}_{\text{final}}(h^L).$$

    SD uses the **whole last hidden state** $c\in\mathbb{R}^{77\times D}$ (D = 768 for SD v1; the tiny model is
    narrower), not CLIP's single pooled vector. Below: the bundled tiny model's text encoder when present, else a
    random one of the same design.
    """),
    LOAD_MODEL,
    code("""
    context = text_encoder(tokenizer(prompts))
    print("context:", tuple(context.shape), "  token table E_tok:", tuple(text_encoder.token_embedding.weight.shape),
          "  position table E_pos:", tuple(text_encoder.position_embedding.weight.shape))
    print(f"text encoder: {sum(p.numel() for p in text_encoder.parameters()):,} parameters "
          f"({text_encoder.config.n_layers} blocks, width {text_encoder.config.width})")
    """),
    md(r"""
    ### Causality: a token only sees the tokens before it

    The attention mask is $M_{ij}=-\infty$ for $j>i$. Change one word, and only the positions from that word on
    change — including every padding position after the text, which is why the padding vectors are not empty:
    they have read the whole prompt, and the UNet attends to them too.
    """),
    code("""
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
    """),
    md(r"""
    ### How similar are the vectors?

    Cosine similarity between the output vectors of the first positions of one prompt. Position 0 (BOS) sees only
    itself, so it is the same vector for every prompt — SD's "attention sink".
    """),
    code("""
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
    """),
    md(r"""
    ### `clip_skip`

    `text_encoder(ids, clip_skip=k)` stops $k$ blocks early (still applying the final LayerNorm): diffusers'
    convention; AUTOMATIC1111's "Clip skip 2" is `clip_skip=1`.
    """),
    code("""
    ids = tokenizer(pair[:1])
    for k in range(text_encoder.config.n_layers):
        diff = (text_encoder(ids, clip_skip=k) - text_encoder(ids)).abs().mean()
        print(f"clip_skip={k}: mean |difference| from the normal output {diff:.4f}")
    """),
    official("a `[B, 77, 768]` context from a 123M-parameter encoder with 12 blocks; the tokenizer is the same"),
]


# ---------------------------------------------------------------------------------------------------------------
# 02 — forward diffusion
# ---------------------------------------------------------------------------------------------------------------

NB02 = [
    md(r"""
    # 2. Forward diffusion: how noise is added

    Training data is destroyed by a fixed Markov chain of $T=1000$ small Gaussian steps (the seed's eq 4.1):

    $$q(x_t\mid x_{t-1}) = \mathcal N\!\left(x_t;\ \sqrt{1-\beta_t}\,x_{t-1},\ \beta_t I\right),$$

    which composes in closed form to

    $$q(x_t\mid x_0) = \mathcal N\!\left(x_t;\ \sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t)I\right),\qquad
      \bar\alpha_t=\prod_{s\le t}(1-\beta_s),\qquad x_t = \sqrt{\bar\alpha_t}\,x_0+\sqrt{1-\bar\alpha_t}\,\varepsilon .$$

    The network learns to undo it (eq 4.2, $p_\theta(x_{t-1}\mid x_t)$). In Stable Diffusion $x_0$ is a VAE
    latent (eq 4.5), but the process does not care what $x_0$ is.

    * `ldm_scratch/diffusion.py` — `Schedule` (β, ᾱ, σ), `Schedule.q_sample`, `Schedule.posterior`,
      `Schedule.eps_to_x0`
    """),
    SETUP,
    md(r"""
    ## The schedule: $\beta_t$, $\bar\alpha_t$ and the signal-to-noise ratio

    SD v1 uses the "scaled linear" schedule: $\beta_t$ is linear in $\sqrt\beta$ from $0.00085$ to $0.012$
    (`Schedule.__init__`). The signal-to-noise ratio $\text{SNR}_t=\bar\alpha_t/(1-\bar\alpha_t)$ falls by eight
    orders of magnitude — but not to zero: $\bar\alpha_{999}\approx 0.0047$, so the last step still contains a
    trace of the image (Lin et al. 2024 discuss what that costs). Dashed: the original DDPM linear schedule
    ($10^{-4}\to0.02$), for comparison.
    """),
    code("""
    from ldm_scratch.diffusion import Schedule

    sched = Schedule()
    t = np.arange(sched.n_train_steps)
    ddpm_beta = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ddpm_alpha_bar = torch.cumprod(1 - ddpm_beta, 0)

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.3))
    axes[0].plot(t, sched.betas, label="SD v1 (scaled linear)"); axes[0].plot(t, ddpm_beta, "--", label="DDPM linear")
    axes[0].set_title(r"$\\beta_t$"); axes[0].legend()
    axes[1].plot(t, sched.alpha_bar.sqrt(), label=r"$\\sqrt{\\bar\\alpha_t}$ (signal)")
    axes[1].plot(t, (1 - sched.alpha_bar).sqrt(), label=r"$\\sqrt{1-\\bar\\alpha_t}$ (noise)")
    axes[1].plot(t, ddpm_alpha_bar.sqrt(), "--", color="C0", alpha=0.5)
    axes[1].set_title("coefficients of $x_0$ and $\\\\varepsilon$"); axes[1].legend()
    axes[2].semilogy(t, sched.alpha_bar / (1 - sched.alpha_bar), label="SD v1")
    axes[2].semilogy(t, ddpm_alpha_bar / (1 - ddpm_alpha_bar), "--", label="DDPM linear")
    axes[2].set_title(r"SNR$_t = \\bar\\alpha_t / (1-\\bar\\alpha_t)$"); axes[2].legend()
    for ax in axes:
        ax.set_xlabel("t")
    plt.show()
    print(f"ᾱ_0 = {sched.alpha_bar[0]:.5f}, ᾱ_999 = {sched.alpha_bar[-1]:.5f}, "
          f"SNR_999 = {sched.alpha_bar[-1] / (1 - sched.alpha_bar[-1]):.2e}, σ_999 = {sched.sigmas[-1]:.2f}")
    """),
    md(r"""
    ## An image, noised

    A picture from the captioned-shapes data set (`ldm_scratch/data/shapes.py`, `render`), in $[-1,1]$, pushed
    through `q_sample` at several $t$ with **one** noise draw $\varepsilon$ — so only the mixing coefficients
    change from panel to panel.
    """),
    code("""
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
    """),
    md(r"""
    ### … and its latent

    Stable Diffusion noises the **latent** $z_0 = s\cdot\mathcal E(x)$ ($s$ = the latent scale, 0.18215 for SD v1;
    see notebook 4). Shown: latent channel 0, and what the VAE decoder makes of each noisy latent. Fine detail
    is gone in the latent long before the pixels look noisy: the latent is 8× smaller on each side (4× for the
    tiny model, whose 64² images have 16² latents).
    """),
    LOAD_MODEL,
    code("""
    x_in = torch.nn.functional.interpolate(x0, size=config.image_size, mode="bilinear") if config.image_size != 64 else x0
    z0 = vae.encode(x_in).mean * config.latent_scale                      # [1, 4, h, w], ≈ unit variance
    eps_z = torch.randn_like(z0)
    noisy = [sched.q_sample(z0, t_, eps_z) for t_ in ts]
    fig, axes = plt.subplots(1, len(ts), figsize=(2 * len(ts), 2.3))
    for ax, z, t_ in zip(axes, noisy, ts):
        ax.imshow(z[0, 0].numpy(), cmap="RdBu_r", vmin=-3, vmax=3); ax.set_title(f"t={t_}"); ax.axis("off")
    fig.suptitle(f"latent channel 0 of z_t, {tuple(z0.shape)}"); plt.show()
    show_row(vae.decode(torch.cat(noisy) / config.latent_scale), [f"t={t_}" for t_ in ts],
             "VAE decoder applied to z_t" + ("" if trained else " (random VAE: meaningless colours)"))
    """),
    md(r"""
    ## Checking $q(x_t\mid x_0)$ empirically

    Run the one-step chain $x_t=\sqrt{1-\beta_t}\,x_{t-1}+\sqrt{\beta_t}\,\varepsilon_t$ a thousand times on
    many copies of three pixel values, and compare the mean and variance at a few $t$ with the closed form
    $\mathcal N(\sqrt{\bar\alpha_t}x_0,(1-\bar\alpha_t))$. With $N$ samples the standard error of the mean is
    $\sqrt{(1-\bar\alpha_t)/N}$ — the table shows the difference in those units (|z| ≲ 3 is agreement).
    Timesteps are 0-based as in the checkpoints: after applying $\beta_0$ the sample is at $t=0$.
    """),
    code("""
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
    """),
    code("""
    step, j = 500, 2
    alpha_bar = sched.alpha_bar[step]
    grid = np.linspace(-4, 4, 200)
    density = np.exp(-(grid - alpha_bar.sqrt().item() * 0.8) ** 2 / (2 * (1 - alpha_bar.item())))
    density /= np.sqrt(2 * np.pi * (1 - alpha_bar.item()))
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(keep[step][:, j].numpy(), bins=100, density=True, alpha=0.6, label="1000-step chain")
    ax.plot(grid, density, "k", label=r"closed form $\\mathcal{N}(\\sqrt{\\bar\\alpha_t}x_0, 1-\\bar\\alpha_t)$")
    ax.set_title(f"x_0 = 0.8, t = {step}"); ax.legend(fontsize=8)
    plt.show()
    """),
    md(r"""
    ### The reverse step the network imitates

    Given $x_0$, one step back is Gaussian too (DDPM eqs 6–7; `Schedule.posterior`):

    $$q(x_{t-1}\mid x_t,x_0)=\mathcal N\!\left(c_0\,x_0 + c_t\,x_t,\ \tilde\beta_t\right),\quad
      c_0=\frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1-\bar\alpha_t},\ \ c_t=\frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t},\ \
      \tilde\beta_t=\frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t .$$

    The reverse process $p_\theta(x_{t-1}\mid x_t)$ of eq 4.2 is this with $x_0$ replaced by the network's guess
    $\hat x_0$. Check: regress the chain's $x_{499}$ on its $x_{500}$ (same $x_0$) — the slope, intercept and
    residual variance are $c_t$, $c_0x_0$ and $\tilde\beta_t$.
    """),
    code("""
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
    mean, variance = sched.posterior(torch.full((1,), value, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), 500)
    assert torch.allclose(mean, c0 * value) and torch.allclose(variance, var) and abs(slope - ct) < 0.01 and abs(residual / var - 1) < 0.03
    """),
    md(r"""
    ## The seed's listing swaps the coefficients

    The seed document's `diffuse` function (section 3.2) writes

    ```python
    noisy_latents = torch.sqrt(1 - alphas[timesteps]) * latents + torch.sqrt(alphas[timesteps]) * noise
    ```

    i.e. $x_t=\sqrt{1-\bar\alpha_t}\,x_0+\sqrt{\bar\alpha_t}\,\varepsilon$ — the two coefficients of eq 4.1 swapped.
    Since $\bar\alpha_t$ *falls* with $t$, this process runs backwards: at $t=999$ it returns
    $0.998\,x_0+0.069\,\varepsilon$, almost the clean image, and at $t=0$ almost pure noise. A model trained on
    it would learn nothing about the schedule every sampler assumes. `ldm_scratch/diffusion.py` follows the
    equation, and `tests/test_diffusion.py` checks it.
    """),
    code("""
    def diffuse_seed(latents, noise, timesteps):          # the seed's listing, with alphas = ᾱ
        alphas = sched.alpha_bar.float()
        return torch.sqrt(1 - alphas[timesteps]) * latents + torch.sqrt(alphas[timesteps]) * noise

    for t_ in (0, 500, 999):
        seed_x, right_x = diffuse_seed(x0, eps, t_), sched.q_sample(x0, t_, eps)
        corr = lambda a: torch.corrcoef(torch.stack([a.flatten(), x0.flatten()]))[0, 1].item()
        print(f"t={t_:3d}: correlation with x_0 — seed's listing {corr(seed_x):.3f}, eq 4.1 {corr(right_x):.3f}")
    show_row([diffuse_seed(x0, eps, t_)[0] for t_ in ts], [f"t={t_}" for t_ in ts],
             "the seed's swapped listing: t=999 is almost the clean image")
    """),
    md(r"""
    Its `denoise` companion, $\hat x_0=(x_t-\hat\varepsilon\,(1-\bar\alpha)/\sqrt{\bar\alpha})/\sqrt{1-\bar\alpha}$, does
    not even invert its own `diffuse`: even with the *true* noise it returns
    $x_0+\varepsilon\,(2\bar\alpha-1)/\sqrt{\bar\alpha(1-\bar\alpha)}$. Eq 4.1 solved for $x_0$
    (`Schedule.eps_to_x0`: $\hat x_0=(x_t-\sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$) recovers
    $x_0$ exactly from the true noise.
    """),
    code("""
    def denoise_seed(noisy, noise_pred, timesteps):        # the seed's listing, given the true noise
        alphas = sched.alpha_bar.float()
        return (noisy - noise_pred * (1 - alphas[timesteps]) / torch.sqrt(alphas[timesteps])) / torch.sqrt(1 - alphas[timesteps])

    print("  t   seed: max|x̂₀ − x₀|   eps_to_x0: max|x̂₀ − x₀|")
    for t_ in (10, 250, 500, 750, 990):
        seed_err = (denoise_seed(diffuse_seed(x0, eps, t_), eps, t_) - x0).abs().max()
        ours_err = (sched.eps_to_x0(sched.q_sample(x0, t_, eps), t_, eps) - x0).abs().max()
        print(f"{t_:4d}   {seed_err:16.3f}   {ours_err:18.2e}")
    """),
    official("the same schedule (it is fixed by the checkpoint's training), a `[1, 4, 64, 64]` latent for a "
             "512² image, and decoded noisy latents that look like smeared colour fields"),
]


# ---------------------------------------------------------------------------------------------------------------
# 03 — the UNet
# ---------------------------------------------------------------------------------------------------------------

NB03 = [
    md(r"""
    # 3. The UNet: $\varepsilon_\theta(x_t, t, c)$

    The denoiser takes a noisy latent $x_t$ `[B, 4, h, w]`, the timestep $t$ and the text context $c$
    `[B, 77, D]`, and predicts the noise $\hat\varepsilon$ `[B, 4, h, w]` (trained with eq 4.3,
    $\mathcal L=\mathbb E\|\varepsilon-\varepsilon_\theta(x_t,t,c)\|^2$).

    * `ldm_scratch/unet.py` — `timestep_embedding`, `ResBlock`, `SpatialTransformer` / `TransformerBlock`,
      `Attention`, `DownLevel` / `Middle` / `UpLevel`, `UNet.forward`

    This notebook looks inside: the shapes at every level (with forward hooks), the timestep embedding, and the
    cross-attention maps that tie each prompt token to places in the image.
    """),
    SETUP,
    LOAD_MODEL,
    code("""
    print(unet.config)
    print(f"UNet: {sum(p.numel() for p in unet.parameters()):,} parameters")
    """),
    md(r"""
    ## Shapes through the levels

    A forward hook on every top-level part of the UNet records the shape of what comes out. The encoder half
    halves the resolution three times; the decoder half doubles it back, each ResBlock there taking one skip
    connection from the encoder (`UpLevel.forward`: `torch.cat([x, skips.pop()], dim=1)`).
    """),
    code("""
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
    """),
    md(r"""
    The same trace for the **full-size SD v1 UNet** (859,520,964 parameters), built on PyTorch's `meta` device:
    tensors there have shapes but no memory and no values, so this costs nothing — the shapes are exactly the
    table in `unet.py`'s docstring.
    """),
    code("""
    from ldm_scratch.unet import UNetConfig

    with torch.device("meta"):
        full = UNet(UNetConfig())
        print(f"SD v1 UNet: {sum(p.numel() for p in full.parameters()):,} parameters")
        trace_shapes(full, torch.zeros(1, 4, 64, 64), torch.tensor([500]), torch.zeros(1, 77, 768))
    del full
    """),
    md(r"""
    ## The timestep embedding

    `timestep_embedding(t, dim)`: $\text{emb}(t) = [\cos(t\,\omega_0),\dots,\cos(t\,\omega_{d/2-1}),
    \sin(t\,\omega_0),\dots]$ with $\omega_i=10000^{-i/(d/2)}$ — the Transformer's position code, with $t$ as the
    position. Low channels oscillate fast (they tell nearby $t$ apart), high channels slowly (they say roughly
    where in the schedule we are). An MLP (`TimestepMLP`) turns it into the vector every ResBlock adds as a
    per-channel bias.
    """),
    code("""
    from ldm_scratch.unet import timestep_embedding

    ts = torch.arange(1000)
    emb = timestep_embedding(ts, 320)                      # SD v1's size: [1000, 320]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.4))
    axes[0].imshow(emb.T.numpy(), aspect="auto", cmap="RdBu_r")
    axes[0].set_xlabel("t"); axes[0].set_ylabel("channel (cos half, then sin half)")
    axes[0].set_title("timestep_embedding(t, 320)")
    for ch in (0, 20, 60, 120):
        axes[1].plot(ts, emb[:, ch], label=f"channel {ch}")
    axes[1].set_xlim(0, 200); axes[1].legend(fontsize=8); axes[1].set_xlabel("t"); axes[1].set_title("a few channels")
    unit = torch.nn.functional.normalize(emb, dim=-1)
    axes[2].imshow((unit @ unit.T).numpy(), cmap="viridis")
    axes[2].set_title("cosine similarity emb(t)·emb(t')"); axes[2].set_xlabel("t'"); axes[2].set_ylabel("t")
    plt.show()
    """),
    md(r"""
    ## Cross-attention maps: where does each word look?

    In every `TransformerBlock`, `cross_attn` lets each latent pixel (a query) attend to the 77 context vectors
    (keys and values):

    $$A = \text{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_\text{head}}}\right),\quad Q = x W_q\ [h\cdot w, C],\ \
      K = c\,W_k\ [77, C],\qquad \text{out} = \text{to\_out}(A\,V).$$

    The attention function (`ldm_scratch/attention.py`) is PyTorch's fused SDPA, which never materialises $A$. To
    see it, a forward hook on each `cross_attn` module captures its inputs and recomputes $A$ from the module's own
    `to_q` / `to_k` weights — and checks that $A V$ reproduces the module's output, so the maps are the real
    ones. Column $j$ of $A$, reshaped to $h\times w$, is the map of token $j$; we average heads, and layers after
    resizing them to the latent's size.
    """),
    code("""
    from einops import rearrange
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

    def token_maps(maps, size):
        \"\"\"Average the layers' maps at one resolution: [B, 77, size, size].\"\"\"
        resized = []
        for probs in maps:
            side = int(round(probs.shape[1] ** 0.5))
            grid = rearrange(probs, "b (h w) m -> b m h w", h=side, w=side)
            resized.append(torch.nn.functional.interpolate(grid, size=size, mode="bilinear"))
        return torch.stack(resized).mean(0)
    """),
    md(r"""
    Feed the UNet a real training image's latent, noised to $t=500$, with its caption, and look at the maps of
    the caption's tokens. A trained model's shape word lights up where the shape is and the background word
    around it. With random weights (no bundled model) the maps are noise — the machinery is the same.
    """),
    code("""
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
    print(f"{len(maps)} cross-attention layers, resolutions {sorted({m.shape[1] for m in maps})} pixels")
    per_token = token_maps(maps, size=z0.shape[-1])[0]          # [77, h, w]

    n_text = len(tokenizer.encode(caption))
    labels = ["BOS"] + [tokenizer.decode([i]) for i in ids[0, 1:n_text + 1].tolist()] + ["EOS"]
    fig, axes = plt.subplots(1, len(labels) + 1, figsize=(1.7 * (len(labels) + 1), 2.2))
    axes[0].imshow(((image[0] + 1) / 2).permute(1, 2, 0).numpy()); axes[0].set_title("image")
    for j, (ax, label) in enumerate(zip(axes[1:], labels)):
        ax.imshow(per_token[j].numpy(), cmap="inferno"); ax.set_title(label)
    for ax in axes:
        ax.axis("off")
    plt.show()
    """),
    md(r"""
    Most of the attention mass goes to the BOS position (the "attention sink": the same vector for every prompt,
    notebook 1), so the word maps are faint in absolute terms; each panel is scaled on its own. Share of the
    attention per token, averaged over pixels and layers:
    """),
    code("""
    share = per_token[: len(labels)].mean(dim=(1, 2))
    for label, value in zip(labels, share.tolist()):
        print(f"{label:12s} {value:6.3f}")
    """),
    official("`[1, 4, 64, 64]` latents, 16 cross-attention layers at 64², 32², 16² and 8², and word maps that "
             "outline objects well enough for prompt-to-prompt editing (Hertz et al. 2022)"),
]


# ---------------------------------------------------------------------------------------------------------------
# 04 — the VAE
# ---------------------------------------------------------------------------------------------------------------

NB04 = [
    md(r"""
    # 4. The VAE: pixels ↔ latents

    Latent diffusion (Rombach et al. 2022) runs the diffusion in the latent space of an autoencoder:

    $$\text{encode: } x\,[B,3,H,W]\in[-1,1] \mapsto q(z\mid x)=\mathcal N(\mu,\operatorname{diag}\sigma^2),\ \
      z\,[B,4,H/8,W/8];\qquad \text{decode: } z\mapsto\hat x .$$

    SD v1 maps 512×512×3 pixels (786,432 numbers) to 64×64×4 latents (16,384): 48× fewer, which is why one UNet
    step is affordable. The diffusion itself sees $z_0 = s\cdot z$ with the *latent scale* $s$ (eq 4.5).

    * `ldm_scratch/vae.py` — `VAE.encode`, `VAE.decode`, `DiagonalGaussian` (`.mean`, `.std`, `.sample`, `.kl`)
    * `ldm_scratch/configs.py` — `ModelConfig.latent_scale`
    """),
    SETUP,
    LOAD_MODEL,
    code("""
    from ldm_scratch.data import ShapesDataset

    data = ShapesDataset("train", size=config.image_size, length=16, seed=1)
    images = torch.stack([data[i][0] for i in range(len(data))])               # [16, 3, H, W] in [-1, 1]
    captions = [data[i][1] for i in range(len(data))]
    posterior = vae.encode(images)
    print("images", tuple(images.shape), "→ posterior mean and std", tuple(posterior.mean.shape))
    print(f"compression: {images[0].numel() / posterior.mean[0].numel():.0f}× fewer numbers; "
          f"VAE {sum(p.numel() for p in vae.parameters()):,} parameters")
    """),
    md(r"""
    ## The posterior $q(z\mid x)$

    The encoder predicts a mean and a log-variance per latent number (`DiagonalGaussian`); a sample is
    $z=\mu+\sigma\varepsilon$ (the reparameterisation trick). The KL term
    $\tfrac12\sum(\mu^2+\sigma^2-1-\log\sigma^2)$ was weighted very lightly in training, so $\sigma$ is tiny:
    the encoder is almost deterministic, and pipelines often just use the mean.
    """),
    code("""
    print(f"posterior std: median {posterior.std.median():.2e}, max {posterior.std.max():.2e}; "
          f"|mean| median {posterior.mean.abs().median():.3f}")
    print(f"KL(q(z|x) ‖ N(0, I)) per image: {posterior.kl().mean():.1f} nats")
    z_sample = posterior.sample(torch.Generator().manual_seed(0))
    print(f"max |sample − mean| = {(z_sample - posterior.mean).abs().max():.2e}")
    """),
    md(r"""
    ## The four latent channels

    The latent is still an image: each of its pixels summarises an 8×8 patch (for SD v1; 4×4 for the tiny model).
    Its channels are not RGB, but they are spatial and smooth where the image is.
    """),
    code("""
    z = posterior.mean
    fig, axes = plt.subplots(3, 5, figsize=(10, 6.2))
    for row in range(3):
        axes[row, 0].imshow(((images[row] + 1) / 2).permute(1, 2, 0).numpy())
        axes[row, 0].set_title(captions[row][2:].replace(" on a ", "\\non "), fontsize=7)
        for ch in range(4):
            axes[row, ch + 1].imshow(z[row, ch].numpy(), cmap="RdBu_r")
            axes[row, ch + 1].set_title(f"channel {ch}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    plt.show()
    """),
    md(r"""
    ## The latent scale

    The diffusion process assumes data of roughly unit variance ($q(x_T)\approx\mathcal N(0,I)$ only then). SD v1's
    autoencoder produces latents with std ≈ 5.5, so the pipeline multiplies by $s=0.18215\approx1/5.49$ after
    encoding and divides before decoding (`ldm_scratch/pipeline.py`; never inside the VAE). The number was
    measured once on a batch of training images — do the same here:
    """),
    code("""
    std = z.std().item()
    print(f"std of unscaled latents over {len(images)} images: {std:.3f} → 1/std = {1 / std:.4f}")
    print(f"the model's latent scale: {config.latent_scale}  → scaled std {std * config.latent_scale:.3f}")
    print("per channel mean:", [round(v, 3) for v in z.mean(dim=(0, 2, 3)).tolist()])
    print("per channel std: ", [round(v, 3) for v in z.std(dim=(0, 2, 3)).tolist()])
    fig, ax = plt.subplots(figsize=(6, 2.8))
    for ch in range(4):
        ax.hist((z[:, ch] * config.latent_scale).flatten().numpy(), bins=60, histtype="step", label=f"channel {ch}")
    ax.set_title("scaled latents s·z"); ax.legend(fontsize=8)
    plt.show()
    """),
    md(r"""
    ## Reconstruction

    $\hat x = \mathcal D(z)$ with $z$ the posterior mean. The error is what the whole of Stable Diffusion can
    never do better than: the UNet only ever produces latents.
    """),
    code("""
    recon = vae.decode(z).clamp(-1, 1)
    mse = ((recon - images) ** 2).mean(dim=(1, 2, 3))                      # on [-1, 1]
    psnr = 10 * torch.log10(4 / mse)                                         # peak-to-peak range 2 → 2² = 4
    print(f"reconstruction MSE {mse.mean():.4f}, PSNR {psnr.mean():.1f} dB (min {psnr.min():.1f} dB)")
    fig, axes = plt.subplots(3, 6, figsize=(10, 5.4))
    for k in range(6):
        axes[0, k].imshow(((images[k] + 1) / 2).permute(1, 2, 0).numpy())
        axes[1, k].imshow(((recon[k] + 1) / 2).permute(1, 2, 0).numpy())
        axes[2, k].imshow((recon[k] - images[k]).abs().mean(0).numpy(), cmap="magma", vmin=0, vmax=1)
    for ax, label in zip(axes[:, 0], ["x", "D(E(x))", "|error|"]):
        ax.set_ylabel(label)
    for ax in axes.flat:
        ax.set_xticks([]); ax.set_yticks([])
    plt.show()
    """),
    md(r"""
    What the decoder makes of a latent that no image produced: a draw from $\mathcal N(0,I)/s$ — the starting
    point of every txt2img run, before the UNet has done anything.
    """),
    code("""
    noise = torch.randn(4, *z.shape[1:], generator=torch.Generator().manual_seed(0))
    decoded = vae.decode(noise / config.latent_scale).clamp(-1, 1)
    fig, axes = plt.subplots(1, 4, figsize=(8, 2.2))
    for ax, image in zip(axes, decoded):
        ax.imshow(((image + 1) / 2).permute(1, 2, 0).numpy()); ax.axis("off")
    plt.show()
    """),
    md(r"""
    The full-size SD v1 autoencoder on the `meta` device (shapes without memory): a 512² image becomes a
    `[1, 4, 64, 64]` latent. Its encoder pads its stride-2 convolutions by (0, 1, 0, 1) — right and bottom only —
    as the original was trained (`vae.py`, `Downsample`); a symmetric pad shifts reconstructions by pixels.
    """),
    code("""
    from ldm_scratch.vae import VAEConfig

    with torch.device("meta"):
        full = VAE(VAEConfig())
        print(f"SD v1 VAE: {sum(p.numel() for p in full.parameters()):,} parameters")
        print("512² image → latent", tuple(full.encode(torch.zeros(1, 3, 512, 512)).mean.shape),
              "→ decoded", tuple(full.decode(torch.zeros(1, 4, 64, 64)).shape))
    del full
    """),
    official("latent std ≈ 5.5 on natural images (hence 0.18215), sharp reconstructions with PSNR in the high "
             "20s dB, and encode/decode of one 512² image taking seconds on a CPU"),
]


# ---------------------------------------------------------------------------------------------------------------
# 05 — samplers
# ---------------------------------------------------------------------------------------------------------------

NB05 = [
    md(r"""
    # 5. Samplers: from noise to a latent in a few steps

    A sampler turns the noise predictor into a generator. Each one discretises the same reverse process; they
    differ in how many network calls they need for a given accuracy. All of them see the model the same way,
    `eps_model(x_t, t) -> ε̂`, and report their current guess of the clean latent after every step,

    $$\hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon}{\sqrt{\bar\alpha_t}}\qquad\text{(`Schedule.eps_to_x0`)},$$

    through `callback(i, t, x0_pred)`.

    * `ldm_scratch/samplers/` — one file per family: `ddim.py` (DDIM), `euler.py` (Euler, Euler-ancestral),
      `lms.py`, `heun.py`, `dpmpp.py` (DPM-Solver++ 2M), `plms.py`, `ddpm.py`; `base.py` for what they share
      (`Denoiser`, timestep spacing, the σ-parameterisation)
    * `ldm_scratch/samplers/__init__.py` — `get_sampler(name, **options)`

    The σ-view (Karras et al. 2022) helps: divide $x_t$ by $\sqrt{\bar\alpha_t}$ to get
    $x_\sigma = x_0+\sigma\varepsilon$ with $\sigma_t=\sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$. The deterministic
    samplers then all solve one ODE, the *probability-flow ODE*

    $$\frac{dx_\sigma}{d\sigma} = \frac{x_\sigma - D(x_\sigma,\sigma)}{\sigma} = \hat\varepsilon,\qquad
      D(x_\sigma,\sigma)=\hat x_0,$$

    Euler with one network call per step, Heun and DPM++ with second-order corrections, LMS and PLMS with
    several earlier slopes.
    """),
    SETUP,
    code("""
    from ldm_scratch.diffusion import Schedule
    from ldm_scratch.samplers import SAMPLERS, get_sampler

    sched = Schedule()
    print("samplers:", ", ".join(SAMPLERS))
    """),
    md(r"""
    ## A test problem with a known answer: Gaussian data

    If the data were $x_0\sim\mathcal N(\mu, s^2 I)$, then $x_t\sim\mathcal N(\sqrt{\bar\alpha_t}\mu,\
    (\bar\alpha_t s^2+1-\bar\alpha_t)I)$ and the best possible noise prediction is in closed form:

    $$\varepsilon^*(x_t,t)=\mathbb E[\varepsilon\mid x_t]=
      \frac{\sqrt{1-\bar\alpha_t}\,\bigl(x_t-\sqrt{\bar\alpha_t}\,\mu\bigr)}{\bar\alpha_t s^2+1-\bar\alpha_t}.$$

    So is the exact solution of the probability-flow ODE: in σ-scaling,
    $(x_\sigma-\mu)/\sqrt{s^2+\sigma^2}$ stays constant along it. Every deterministic sampler can then be compared
    with the exact answer from the same start noise. Fractional $t$ (σ-samplers ask for them) is handled through
    σ: $\bar\alpha=1/(1+\sigma^2)$.
    """),
    code("""
    MU, S = 0.5, 1.0

    def gaussian_eps(x_t, t):
        sigma = float(sched.t_to_sigma(t.double()))
        alpha_bar = 1 / (1 + sigma**2)
        return (1 - alpha_bar) ** 0.5 * (x_t - alpha_bar**0.5 * MU) / (alpha_bar * S**2 + 1 - alpha_bar)

    def exact_answer(sampler, noise, steps):
        \"\"\"Where the exact ODE takes the sampler's own start, in the scaling and at the level the sampler stops.\"\"\"
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
        errors[label] = [(sampler.sample(gaussian_eps, noise, steps) - exact_answer(sampler, noise, steps)).abs().max().item()
                         for steps in steps_list]
    print("max |sample − exact ODE solution| over 4096 samples")
    print("steps " + "".join(f"{label:>16s}" for label in errors))
    for k, steps in enumerate(steps_list):
        print(f"{steps:5d} " + "".join(f"{errors[label][k]:16.1e}" for label in errors))
    """),
    code("""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, values in errors.items():
        ax.loglog(steps_list, values, marker="o", label=label, ls="--" if "karras" in label else "-")
    ax.loglog(steps_list, [errors["euler"][0] * steps_list[0] / n for n in steps_list], "k:", label="∝ 1/steps")
    ax.loglog(steps_list, [errors["lms"][2] * (steps_list[2] / n) ** 2 for n in steps_list], "k-.",
              label="∝ 1/steps²")
    ax.set_xlabel("steps (heun: 2 network calls per step)"); ax.set_ylabel("max error")
    ax.set_title("error vs steps on Gaussian data"); ax.legend(fontsize=7)
    plt.show()
    """),
    md(r"""
    Reading the plot: DDIM and Euler are first order (error ∝ 1/steps); Heun, LMS and PLMS reach high accuracy in
    a few dozen steps. DPM++ 2M is a second-order method, yet with diffusers' default "linspace" timesteps it
    looks first order: that grid stops at $t\approx T/\text{steps}$ and jumps from there to $\sigma=0$ with
    $x=\hat x_0$, an error $\approx\tfrac12\sigma_\text{min}^2|x-\mu|/s^2$ with $\sigma_\text{min}^2\propto 1/\text{steps}$.
    With `karras=True` its σ's run down to $\sigma(t{=}0)\approx0.029$ and it shows its order. Every curve
    bottoms out near that last jump, a property of the schedule rather than the solver
    (`scripts/sampler_convergence.py` prints the full table, ancestral samplers included). Each sampler is
    compared with the exact solution from *its own* start: the "leading" samplers (DDIM, PLMS) start at
    $t=751$ for 4 steps, not 999.

    ## Why a few steps are enough

    DDIM and DPM++ are *exponential integrators*: they solve the linear part of the ODE exactly and only
    approximate how $\hat x_0$ changes. Written in $\lambda=-\log\sigma$, the DDIM update is exact whenever
    $\hat x_0$ is constant over a step:

    $$x_{\sigma_{i+1}} = \hat x_0 + \frac{\sigma_{i+1}}{\sigma_i}\,\bigl(x_{\sigma_i}-\hat x_0\bigr).$$

    And $\hat x_0$ changes slowly and smoothly: below, along the exact trajectory from one start value, $x_\sigma$
    falls from about 19 to 1.8 while $D(x_\sigma,\sigma)=\hat x_0$ moves by about one, along a gentle S-curve in
    $\log\sigma$. A solver that steps in $\log\sigma$ and treats $\hat x_0$ as locally constant (DDIM) or
    linear (DPM++ 2M uses the last two) has little to get wrong, and covers the range in ten or twenty steps.
    Euler treats the slope $\hat\varepsilon$ as constant instead; its 8-step $\hat x_0$'s (dots) lag behind.
    """),
    code("""
    sigmas = np.geomspace(float(sched.sigmas[-1]), float(sched.sigmas[0]), 200)      # σ_max = 14.6 … σ_min = 0.029
    x_T = 1.3 * sigmas[0]                                                       # Euler's start for ε = 1.3
    x_sigma = MU + (x_T - MU) / np.sqrt(S**2 + sigmas[0] ** 2) * np.sqrt(S**2 + sigmas**2)
    x0_hat = MU + S**2 / (S**2 + sigmas**2) * (x_sigma - MU)           # D*(x_σ, σ) = E[x_0 | x_σ]
    euler = get_sampler("euler")
    trajectory = []
    euler.sample(gaussian_eps, torch.full((1, 1, 1, 1), 1.3, dtype=torch.float64), 8,
                 callback=lambda i, t, x0_pred: trajectory.append((float(sched.t_to_sigma(t, "linear")), x0_pred.item())))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
    axes[0].semilogx(sigmas, x_sigma); axes[0].set_title(r"exact trajectory $x_\\sigma$"); axes[0].invert_xaxis()
    axes[1].semilogx(sigmas, x0_hat, label=r"exact $D(x_\\sigma,\\sigma)=\\hat x_0$")
    axes[1].semilogx(*zip(*trajectory), "o", label="Euler, 8 steps: x0_pred per step"); axes[1].invert_xaxis()
    axes[1].set_title(r"$\\hat x_0$ along the way"); axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel(r"$\\sigma$ (time runs right →)")
    plt.show()
    """),
    md(r"""
    ## The same start noise through four samplers, on the model

    Now the real thing: the (tiny) UNet with classifier-free guidance (notebook 6) as `eps_model`, one start
    noise, four samplers, and the $\hat x_0$ each reports at every step, decoded by the VAE. This is exactly what
    `pipe.txt2img(..., sampler=name, callback=...)` does inside (`ldm_scratch/pipeline.py`).
    """),
    LOAD_MODEL,
    code("""
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
    """),
    md(r"""
    How far each step's $\hat x_0$ still is from that sampler's final latent: most of the picture is decided in
    the first third of the steps; the rest refines detail.
    """),
    code("""
    fig, ax = plt.subplots(figsize=(6, 3))
    for name, (x0_preds, latent) in runs.items():
        ax.plot([(x - latent).norm().item() / latent.norm().item() for x in x0_preds], marker=".", label=name)
    ax.set_xlabel("step"); ax.set_ylabel("‖x̂₀ − final‖ / ‖final‖"); ax.legend(); ax.set_yscale("log")
    plt.show()
    """),
    md(r"""
    The pipeline runs the same loop: `pipe.txt2img(prompt, latents=start, sampler="ddim", ...)` gives the DDIM
    row's final latent (it batches the unconditional and conditional halves in the other order, which changes
    nothing but rounding).
    """),
    code("""
    latent = pipe.txt2img(prompt, latents=start, sampler="ddim", steps=steps, guidance_scale=guidance_scale,
                          output_type="latent", progress=False)
    print(f"max |pipeline − loop above| = {(latent - runs['ddim'][1]).abs().max():.2e}")
    torch.testing.assert_close(latent, runs["ddim"][1], atol=1e-4, rtol=1e-4)
    """),
    official("512² images after decoding; 20–30 steps of DPM++ 2M or Euler look as good as 50 of DDIM, and the "
             "x̂₀ strip shows composition first, then colours, then texture"),
]


# ---------------------------------------------------------------------------------------------------------------
# 06 — classifier-free guidance
# ---------------------------------------------------------------------------------------------------------------

NB06 = [
    md(r"""
    # 6. Classifier-free guidance

    One network, two predictions per step: with the prompt $c$ and with the empty prompt $\varnothing$
    (`CLIP("")`). The sampler is given their extrapolation (the seed's eq 4.4; Ho & Salimans 2022):

    $$\hat\varepsilon_\theta(x_t,t,c)=\varepsilon_\theta(x_t,t,\varnothing)+s\cdot\bigl(\varepsilon_\theta(x_t,t,c)-\varepsilon_\theta(x_t,t,\varnothing)\bigr).$$

    $s=0$ ignores the prompt, $s=1$ is the plain conditional model, $s>1$ goes *further* in the direction the
    prompt points. Why it works: $\varepsilon$ is a scaled score, $\varepsilon_\theta\approx-\sqrt{1-\bar\alpha_t}\,
    \nabla\log p(x_t)$, so the guided prediction is the score of $p(x_t)\,p(c\mid x_t)^s$ — an implicit classifier
    $\nabla\log p(c\mid x_t)=\nabla\log p(x_t\mid c)-\nabla\log p(x_t)$, sharpened by the power $s$. The model
    learns $\varepsilon_\theta(\cdot,\varnothing)$ because training replaces 10 % of the captions by ""
    (`ldm_scratch/train.py`, `TrainConfig.caption_dropout`).

    * `ldm_scratch/diffusion.py` — `classifier_free_guidance`
    * `ldm_scratch/pipeline.py` — `StableDiffusion._eps_model` (one UNet call on the batch `[uncond; cond]`),
      `txt2img(..., guidance_scale=, negative_prompt=)`
    """),
    SETUP,
    LOAD_MODEL,
    md(r"""
    ## One step, taken apart

    A latent noised to $t=600$, the two predictions, and what each guidance scale makes of them, shown as the
    clean image it implies, $\hat x_0=(x_t-\sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$.
    """),
    code("""
    from ldm_scratch.diffusion import classifier_free_guidance

    prompt = "a red circle on a blue background"
    side = config.image_size // config.vae.downsample_factor
    x_t = pipe.schedule.q_sample(torch.zeros(1, config.latent_channels, side, side), 600,
                                 torch.randn(1, config.latent_channels, side, side, generator=torch.Generator().manual_seed(1)))
    context = text_encoder(tokenizer(["", prompt]))                          # [∅; c]
    eps_uncond, eps_cond = unet(torch.cat([x_t, x_t]), torch.tensor(600), context).chunk(2)

    torch.testing.assert_close(classifier_free_guidance(eps_uncond, eps_cond, 1.0), eps_cond)    # s = 1: conditional
    torch.testing.assert_close(classifier_free_guidance(eps_uncond, eps_cond, 0.0), eps_uncond)  # s = 0: unconditional
    print(f"‖ε_c − ε_∅‖ / ‖ε_∅‖ = {(eps_cond - eps_uncond).norm() / eps_uncond.norm():.3f}  (the guidance direction is small)")

    scales = [0.0, 1.0, 3.0, 7.5]
    x0_preds = torch.cat([pipe.schedule.eps_to_x0(x_t, 600, classifier_free_guidance(eps_uncond, eps_cond, s))
                          for s in scales])
    pictures = (vae.decode(x0_preds / config.latent_scale).clamp(-1, 1) + 1) / 2
    fig, axes = plt.subplots(1, len(scales), figsize=(2.2 * len(scales), 2.4))
    for ax, picture, s in zip(axes, pictures, scales):
        ax.imshow(picture.permute(1, 2, 0).numpy()); ax.set_title(f"x̂₀ at t=600, s={s}"); ax.axis("off")
    plt.show()
    """),
    md(r"""
    ## A guidance-scale sweep

    Same seeds, same sampler, only $s$ changes (columns). Low $s$: the prompt is a suggestion; rising $s$: the
    colours and the shape snap to the caption; very high $s$: saturated, over-sharpened images, because the
    extrapolation leaves the range of latents the network has seen.
    """),
    code("""
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
        axes[row, 0].set_ylabel(p[2:].replace(" on a ", "\\non "), fontsize=7)
    plt.show()
    """),
    md(r"""
    ### Measured, not eyeballed

    The shapes data set comes with a checker that reads shape, colour and background back from the pixels
    (`ldm_scratch/data/checker.py`, `check`). The fraction of images it reads as exactly their caption, for
    twelve training captions and two seeds each, as a function of $s$:
    """),
    code("""
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
    """),
    md(r"""
    ## Negative prompts

    A negative prompt simply takes the place of $\varnothing$:
    $\hat\varepsilon=\varepsilon_\theta(x_t,t,c_\text{neg})+s\,(\varepsilon_\theta(x_t,t,c)-\varepsilon_\theta(x_t,t,c_\text{neg}))$.
    The guidance direction becomes "from the negative towards the prompt": what the two share cancels, and
    whatever the negative says is pushed away from. Below, the same prompt and seeds with three negatives. When
    the negative differs from the prompt only in the shape, the guidance pushes hard on the shape and not at all
    on the colours, which are then left to the conditional model alone.
    """),
    code("""
    prompt = "a green ring on a white background"
    negatives = ["", "a green circle on a white background", "a red ring on a white background"]
    rows = [pipe.txt2img(prompt, negative_prompt=negative, guidance_scale=6.0, num_images=4, steps=15, seed=3,
                         output_type="np", progress=False) for negative in negatives]
    fig, axes = plt.subplots(len(negatives), 4, figsize=(8, 2.1 * len(negatives)))
    for row, (negative, images) in enumerate(zip(negatives, rows)):
        for col, image in enumerate(images):
            axes[row, col].imshow(image); axes[row, col].set_xticks([]); axes[row, col].set_yticks([])
        axes[row, 0].set_ylabel(f"negative:\\n{negative or '(empty)'}", fontsize=7)
    fig.suptitle(prompt); plt.show()
    """),
    official("guidance 7.5 as the usual default; below 3 prompts are followed loosely, above 12–15 colours "
             "burn; negative prompts like \"blurry, low quality\" work because CLIP puts such words near the "
             "images that had them"),
]


# ---------------------------------------------------------------------------------------------------------------
# 07 — img2img and inpainting
# ---------------------------------------------------------------------------------------------------------------

NB07 = [
    md(r"""
    # 7. img2img and inpainting

    Both start the reverse process from something other than pure noise.

    **img2img**: encode the image, $z_0=s\cdot\mathcal E(x)$, noise it to an intermediate level with the forward
    process, $z_{t_\text{start}}=\sqrt{\bar\alpha_{t_\text{start}}}\,z_0+\sqrt{1-\bar\alpha_{t_\text{start}}}\,\varepsilon$,
    and run only the remaining steps with the new prompt. `strength` chooses the start: of `steps` steps, the last
    `int(steps × strength)` run.

    **Inpainting**: keep the pixels outside a mask, generate inside it — either by *mask blending* with a regular
    model, or with the 9-channel inpainting model trained for it.

    * `ldm_scratch/pipeline.py` — `StableDiffusion.img2img`, `StableDiffusion.inpaint`
    * `ldm_scratch/samplers/base.py` — `steps_to_run`, `Sampler.sample(x0=, strength=, after_step=)`,
      `Sampler.noise_to_level`
    """),
    SETUP,
    LOAD_MODEL,
    md(r"""
    ## Strength is a start time

    For 30 DDIM steps: the timestep the run starts at, and how much of the image survives there
    ($\sqrt{\bar\alpha_t}$, the coefficient of $z_0$). Strength 1 starts at the first step — almost pure noise,
    though SD's schedule still leaves $\sqrt{\bar\alpha}\approx0.07$ of the image (notebook 2), which is why
    img2img at strength 1 keeps a hint of the layout.
    """),
    code("""
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
    axes[1].set_xlabel("strength"); axes[1].set_title(r"$\\sqrt{\\bar\\alpha_{t_{start}}}$: the image's share")
    plt.show()
    """),
    md(r"""
    ## img2img: a red circle asked to become a yellow star

    Low strength keeps the picture; high strength follows the prompt. The seed is the same in every column.
    """),
    code("""
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
    """),
    md(r"""
    ## Inpainting with a regular model: mask blending

    A regular (4-channel) model has never seen a mask. The pipeline steers it instead: after every step $i$ the
    sampler's state $x$ is overwritten outside the hole by the original latents noised to the state's current
    level (`Sampler.noise_to_level`), with the mask $m$ at latent size (1 = repaint):

    $$x \leftarrow m\odot x + (1-m)\odot\bigl(\sqrt{\bar\alpha_{t_{i+1}}}\,z_0+\sqrt{1-\bar\alpha_{t_{i+1}}}\,\varepsilon\bigr).$$

    The model only ever sees a consistent noisy image; the kept part is exactly the original at the end. Its
    weakness: the hole's content cannot influence the kept part, so seams can show — and the mask is only as
    fine as the latent grid (8 pixels).
    """),
    code("""
    from PIL import Image

    image = render("square", "yellow", "green", size=config.image_size)
    size = config.image_size
    mask = np.zeros((size, size), dtype=np.float32)
    mask[:, size // 2:] = 1.0                                                # repaint the right half
    prompt = "a yellow square on a purple background"
    results = pipe.inpaint(prompt, image, mask, num_images=3, steps=20, guidance_scale=5.0, seed=0,
                           output_type="np", progress=False)
    assert not pipe.is_inpainting_model
    panels = [np.asarray(image) / 255, np.repeat(mask[..., None], 3, axis=2), *results]
    titles = ["image", "mask (white = repaint)", "seed 0", "seed 1", "seed 2"]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.1 * len(panels), 2.4))
    for ax, panel, title in zip(axes, panels, titles):
        ax.imshow(panel); ax.set_title(title, fontsize=9); ax.axis("off")
    fig.suptitle(f"mask blending: {prompt}"); plt.show()
    kept = (results[:, :, : size // 2 - 8] - np.asarray(image)[None, :, : size // 2 - 8] / 255)
    print(f"left half (away from the seam), mean |output − original| = {np.abs(kept).mean():.3f} "
          "(only the VAE round trip changes it)")
    """),
    md(r"""
    ## The 9-channel inpainting model

    `sd-v1-5-inpainting` was fine-tuned with a wider first convolution: its UNet reads 9 channels,

    $$\text{input} = \bigl[\,x_t\ (4),\ \ m\ (1),\ \ s\cdot\mathcal E\bigl(x\odot(1-m)\bigr)\ (4)\,\bigr],$$

    the noisy latent, the mask at latent size, and the latent of the image with the hole blanked (grey). The
    extra 5 channels are the same at every step (`StableDiffusion.inpaint` builds them once, `_eps_model` appends
    them), so the model sees what must be kept *and* can adapt the seam: it fills the hole itself, no blending.
    Only `input_conv` differs from the regular UNet (`UNetConfig(in_channels=9)`).

    No trained 9-channel tiny model ships, so here is one with random weights — the point is the plumbing: a
    forward hook shows the UNet input the pipeline builds. With the official file, load it like any other:
    `load_pipeline("weights/sd-v1-5-inpainting.ckpt")`, and `pipe.inpaint` switches to this mode by
    itself (`pipe.is_inpainting_model`).
    """),
    code("""
    import dataclasses

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
        ax.set_xticks([]); ax.set_yticks([])                     # keep the frame: the mask's white half shows
    plt.show()
    """),
    official("the same calls at 512²; mask blending works with any SD v1 checkpoint, and the inpainting "
             "checkpoint gives seamless fills at strength 1"),
]


# ---------------------------------------------------------------------------------------------------------------
# 08 — train your own
# ---------------------------------------------------------------------------------------------------------------

NB08 = [
    md(r"""
    # 8. Train your own

    The bundled model was trained from scratch by `ldm_scratch/train.py` (`train(TrainConfig())`, or
    `python -m ldm_scratch.train --out runs/tiny`: about half an hour on 2 CPU cores). Two stages, as in latent
    diffusion:

    1. the autoencoder, on pixels: $\ \mathcal L_\text{VAE}=|x-\hat x|+(x-\hat x)^2+\lambda_\text{KL}\,\mathrm{KL}(q(z\mid x)\,\|\,\mathcal N(0,I))$;
    2. with the autoencoder frozen, the text encoder and the UNet together, on scaled latents $z_0=s\cdot z$:

    $$t\sim\mathcal U\{0,\dots,999\},\ \ \varepsilon\sim\mathcal N(0,I),\ \ z_t=\sqrt{\bar\alpha_t}\,z_0+\sqrt{1-\bar\alpha_t}\,\varepsilon,\qquad
      \mathcal L=\mathbb E\,\|\varepsilon-\varepsilon_\theta(z_t,t,c)\|^2\quad\text{(eq 4.3)},$$

    with the caption replaced by "" 10 % of the time so that classifier-free guidance works (notebook 6).

    This notebook runs stage 2 for about a minute — from freshly initialised networks, on top of the bundled
    model's trained autoencoder — with a live loss curve and samples along the way. Each step is the loop body of
    `train()` (without its checkpointing and multi-process plumbing), built from `train.py`'s own pieces:
    `render_training_set`, `tokenize_all`, `build_models`, `TextToEps`, `learning_rate`, `generate`, and
    `diffusion.eps_loss`.
    """),
    SETUP,
    LOAD_MODEL,
    code("""
    import time

    from IPython.display import clear_output, display

    from ldm_scratch.diffusion import eps_loss
    from ldm_scratch.train import (TextToEps, build_models, generate, learning_rate, render_training_set,
                                   to_model_range, tokenize_all)

    N_IMAGES, BATCH, STEPS, PEAK_LR, WARMUP = 256, 32, 100, 2e-3, 10
    images, captions = render_training_set(N_IMAGES, config.image_size, seed=0)   # uint8 [N, 3, 64, 64]
    with torch.no_grad():                                     # the frozen autoencoder: encode the data once
        z0_all = torch.cat([vae.encode(to_model_range(b)).mean for b in images.split(128)]) * config.latent_scale
    ids_all = tokenize_all(tokenizer, captions)                                   # [N, 77]
    empty_ids = tokenizer([""])[0]
    print(f"{N_IMAGES} images → latents {tuple(z0_all.shape)}, std {z0_all.std():.3f} (the latent scale makes it ≈ 1)")

    new_text_encoder, new_unet, _ = build_models(config, seed=0)                  # fresh weights, same sizes
    model = TextToEps(new_text_encoder, new_unet).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    print(f"training {sum(p.numel() for p in model.parameters()):,} parameters")
    """),
    md(r"""
    As a yardstick, the bundled (fully trained) model's loss on fixed evaluation batches. The loss never gets near
    0: at large $t$ the noise is almost all there is to see and $\varepsilon$ is easy, at small $t$ it is a tiny
    perturbation of an unknown image and nearly unpredictable, so the average stays well above zero even for a
    perfect model.
    """),
    code("""
    eval_gen = torch.Generator().manual_seed(123)
    eval_batches = []
    for _ in range(4):
        index = torch.randint(N_IMAGES, (64,), generator=eval_gen)
        t = torch.randint(1000, (64,), generator=eval_gen)
        eps = torch.randn(z0_all[index].shape, generator=eval_gen)
        eval_batches.append((pipe.schedule.q_sample(z0_all[index], t, eps), t, ids_all[index], eps))

    @torch.no_grad()
    def eval_loss(eps_net):
        return float(np.mean([eps_loss(eps, eps_net(z_t, t, ids)).item() for z_t, t, ids, eps in eval_batches]))

    reference = eval_loss(lambda z_t, t, ids: unet(z_t, t, text_encoder(ids)))
    print(f"bundled model's loss: {reference:.3f}" + ("" if trained else "  (random weights: no reference)"))
    """),
    code("""
    sample_captions = ["a red circle on a blue background", "a yellow square on a green background",
                       "a white star on a purple background", "a blue ring on a yellow background"]
    losses, evals, snapshots = [], [], []
    start = time.time()
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, STEPS, PEAK_LR, WARMUP)
        index = torch.randint(N_IMAGES, (BATCH,), generator=generator)
        z0 = z0_all[index]
        t = torch.randint(1000, (BATCH,), generator=generator)                   # t ~ U{0, …, 999}
        eps = torch.randn(z0.shape, generator=generator)                         # ε ~ N(0, I)
        z_t = pipe.schedule.q_sample(z0, t, eps)                                 # z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
        drop = torch.rand(BATCH, generator=generator) < 0.1                      # caption → "" (for CFG)
        ids = torch.where(drop[:, None], empty_ids, ids_all[index])
        loss = eps_loss(eps, model(z_t, t, ids))                                 # ‖ε − ε_θ(z_t, t, c)‖²
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())

        if (step + 1) % 25 == 0:                                                 # live: loss curve + samples
            model.eval()
            evals.append((step + 1, eval_loss(model)))
            snapshots.append((step + 1, generate(new_text_encoder, new_unet, vae, tokenizer, config,
                                                 sample_captions, seed=0, steps=10, guidance_scale=4.0)))
            model.train()
            clear_output(wait=True)
            fig, axes = plt.subplots(1, 2, figsize=(12, 3), gridspec_kw={"width_ratios": [1.3, 1]})
            axes[0].plot(losses, alpha=0.4, label="training batch")
            axes[0].plot(*zip(*evals), "o-", label="evaluation batches")
            if trained:
                axes[0].axhline(reference, color="k", ls="--", label="bundled model")
            axes[0].set_xlabel("step"); axes[0].set_ylabel("ε-loss"); axes[0].set_ylim(0, 1.2); axes[0].legend()
            axes[1].imshow(torch.cat(list(snapshots[-1][1]), dim=2).permute(1, 2, 0).numpy()); axes[1].axis("off")
            axes[1].set_title(f"samples after {step + 1} steps ({time.time() - start:.0f} s)")
            display(fig); plt.close(fig)
    """),
    md(r"""
    The samples at each snapshot (rows), for the four captions (columns). After a minute the network has learnt
    the colours of backgrounds and roughly where a shape goes; shapes and their colours need the full run.
    """),
    code("""
    fig, axes = plt.subplots(len(snapshots), 1, figsize=(6, 1.6 * len(snapshots)))
    for ax, (step, grid) in zip(np.atleast_1d(axes), snapshots):
        ax.imshow(torch.cat(list(grid), dim=2).permute(1, 2, 0).numpy()); ax.set_xticks([]); ax.set_yticks([])
        ax.set_ylabel(f"step {step}", fontsize=8)
    plt.show()
    """),
    md(r"""
    ## The full run

    ```bash
    python -m ldm_scratch.train --out runs/tiny          # both stages, the bundled model's recipe (TrainConfig)
    python -m ldm_scratch.train --help                   # every TrainConfig field is a flag
    ```

    It writes `runs/tiny/model.safetensors` in the official single-file layout (config in its metadata), resumable
    checkpoints and sample grids; `ldm_scratch.load_pipeline("runs/tiny/model.safetensors")` loads the result
    for every other notebook. In Python: `from ldm_scratch.train import TrainConfig, train;
    history = train(TrainConfig(out_dir="runs/tiny"))` returns the loss curves of both stages.

    **On the official weights.** SD v1 was trained the same way (stage 2 only: its autoencoder was trained
    separately) on LAION image–caption pairs for hundreds of thousands of GPU hours — nothing to rerun on a
    laptop, but the loss above is the very same line of code.
    """),
]


NOTEBOOKS = {
    "01_tokenizer_and_text_encoder": NB01,
    "02_forward_diffusion": NB02,
    "03_unet": NB03,
    "04_vae": NB04,
    "05_samplers": NB05,
    "06_classifier_free_guidance": NB06,
    "07_img2img_and_inpainting": NB07,
    "08_train_your_own": NB08,
}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for k, (kind, source) in enumerate(cells):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        cell.id = f"{name[:2]}-{k:02d}"        # fixed ids, so rebuilding gives identical files
        notebook.cells.append(cell)
    nbformat.validate(notebook)
    return notebook


def render_json(notebook: nbformat.NotebookNode) -> str:
    return json.dumps(notebook, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare the committed notebooks with the build")
    args = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = NOTEBOOK_DIR / f"{name}.ipynb"
        text = render_json(build(name, cells))
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            NOTEBOOK_DIR.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote notebooks/{path.name} ({len(cells)} cells)")
    if stale:
        print(f"out of date with scripts/build_notebooks.py: {', '.join(stale)}; run python scripts/build_notebooks.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
