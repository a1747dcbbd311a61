"""The CLIP text transformer: token ids → the per-token embeddings the UNet cross-attends to.

Stable Diffusion v1 conditions its UNet on the text tower of OpenAI's CLIP ViT-L/14, frozen. It reads the 77 token
ids of a prompt (tokenizer.py) and returns one 768-d vector per token, the "context" each cross-attention layer of
the UNet attends to:

    input_ids [B, 77]  →  context [B, 77, 768]

It is a GPT-2-style causal transformer (Radford et al. 2021, §2.4: "masked self-attention"), with pre-LayerNorm
residual blocks. Per token position i (0-based) and block l = 1 … L:

    h⁰_i = E_tok[id_i] + E_pos[i]                                   token + learned position embedding
    a    = LN₁(hˡ⁻¹)                 LN(x) = (x − μ) / √(σ² + ε) · γ + β, μ and σ² over the C = 768 channels
    hˡ'  = hˡ⁻¹ + W_o · Attn(W_q a + b_q, W_k a + b_k, W_v a + b_v) + b_o          causal self-attention
    hˡ   = hˡ' + W₂ · quick_gelu(W₁ · LN₂(hˡ') + b₁) + b₂              quick_gelu(x) = x · σ(1.702 x)
    out  = LN_final(hᴸ)

with Attn(Q, K, V) = softmax(Q Kᵀ / √d_head + M) V per head, M_ij = −∞ for j > i (attention.py).

The output is the *whole* last hidden state, not CLIP's pooled end-of-text vector: SD cross-attends to every token,
including the padding (SD v1 pads with the end-of-text id, and those positions carry information too).

`clip_skip` (diffusers' convention): use the output of an earlier block, still passed through LN_final.
clip_skip = k returns LN_final(h^{L−k}); k = 0 (or None) is the normal output. AUTOMATIC1111's web UI counts
differently: its "Clip skip: 1" is the normal output and "Clip skip: 2" (common for anime-style fine-tunes) is
diffusers' clip_skip = 1, i.e. the penultimate block, h^{L−1} for L = 12.

SD 2 (one code, a second config: `openclip_text_config`) conditions on the text tower of OpenCLIP ViT-H/14
(trained by LAION on LAION-2B): the same pre-LN causal transformer, wider and deeper — 24 blocks of width 1024,
16 heads of 64, MLP 4096 — with exact GELU (x · Φ(x)) instead of quick-GELU, and ln_final. Its context is
[B, 77, 1024]. SD 2 does not read the last block: its FrozenOpenCLIPEmbedder was configured with
`layer: "penultimate"`, i.e. LN_final(h²³) — the output of block 23 of 24, through the final LayerNorm (the
same thing as clip_skip = 1 on the full tower). Why: the last block is the one CLIP's contrastive loss shapes
most directly, and that loss reads only the end-of-text token (pooled and projected); the per-token features
one block earlier are less specialised to that one vector, and Stability trained SD 2 on them. So we build
the 23 blocks SD 2 uses (as diffusers does: its converted text_encoder has num_hidden_layers = 23); the file's
block 23 is allowed, unused, by name (checkpoint/openclip_keys.py), and `clip_skip` counts from block 23.

Module names are ours; CLIP_RULES in checkpoint/keymap.py maps the official
`cond_stage_model.transformer.text_model.*` names onto them
(e.g. `encoder.layers.3.self_attn.q_proj` → `blocks.3.attn.q`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention


@dataclass
class CLIPTextConfig:
    """Sizes of the text transformer. Defaults: OpenAI CLIP ViT-L/14's text tower, as used by SD v1.x (123M params)."""
    vocab_size: int = 49408      # 2·256 byte tokens (plain and word-final) + 48,894 merges + 2 specials (BOS, EOS)
    width: int = 768             # channels per token, C
    n_layers: int = 12           # transformer blocks, L
    n_heads: int = 12            # attention heads; d_head = width / n_heads = 64
    mlp_width: int = 3072        # hidden size of each block's MLP (4 · width)
    max_positions: int = 77      # learned position embeddings = the longest token sequence
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP, SD v1) or "gelu" (OpenCLIP, SD v2)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.n_heads:
            raise ValueError(f"width {self.width} is not divisible by n_heads {self.n_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{self.activation}'; choose one of {sorted(ACTIVATIONS)}")


def openclip_text_config(n_layers: int = 23) -> CLIPTextConfig:
    """SD 2's text encoder: OpenCLIP ViT-H/14's text tower, cut after its penultimate block (module docstring).
    n_layers = 24 is the whole tower (open_clip's own text encoder, before text_projection)."""
    return CLIPTextConfig(width=1024, n_layers=n_layers, n_heads=16, mlp_width=4096, activation="gelu")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """quick_gelu(x) = x · σ(1.702 x).

    A cheap sigmoid approximation of GELU(x) = x · Φ(x) (Hendrycks & Gimpel 2016, §2; they differ by < 0.021).
    OpenAI trained CLIP with this approximation, so the weights expect it: exact GELU would shift every activation
    a little, and the error compounds over 12 blocks.
    """
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where token i attends only to tokens j ≤ i. x [B, N, C] → [B, N, C].

        Q = W_q x + b_q,  K = W_k x + b_k,  V = W_v x + b_v
        out = W_o · concat_heads(softmax(Q Kᵀ / √d_head + M) V) + b_o,   M_ij = −∞ for j > i
    """

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(attention(self.q(x), self.k(x), self.v(x), self.n_heads, causal=True, layer=self))


class MLP(nn.Module):
    """Position-wise feed-forward: x [B, N, C] → W₂ · act(W₁ x + b₁) + b₂ [B, N, C], hidden width 4C."""

    def __init__(self, width: int, mlp_width: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class Block(nn.Module):
    """One pre-LayerNorm transformer block, h [B, N, C] → [B, N, C].

        h' = h + Attn(LN₁(h))        (the residual stream is never normalised itself; each branch reads a
        h″ = h' + MLP(LN₂(h'))        normalised copy — "pre-LN", as in GPT-2)
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config.width, config.n_heads)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config.width, config.mlp_width, config.activation)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h))  # h' = h + Attn(LN₁(h))
        h = h + self.mlp(self.norm2(h))   # h″ = h' + MLP(LN₂(h'))
        return h


def _embedding(n: int, dim: int) -> nn.Embedding:
    """A table of n learned vectors [n, dim], initialised N(0, 1) like nn.Embedding's own (the same random draws).

    On the meta device, where the checkpoint loader builds the networks before filling them, there is nothing to
    draw, so the draw is skipped: PyTorch would send it through its Python reference code, whose first use imports
    torch._dynamo — 68 MiB of modules that then stay resident for the life of the process."""
    weight = torch.empty(n, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(n, dim, _weight=weight)


class CLIPTextModel(nn.Module):
    """CLIP's text transformer. forward(input_ids [B, N ≤ 77], clip_skip=None) → [B, N, 768] (see module docstring)."""

    def __init__(self, config: CLIPTextConfig | None = None):
        super().__init__()
        self.config = config = config or CLIPTextConfig()
        self.token_embedding = _embedding(config.vocab_size, config.width)        # E_tok [V, C]
        self.position_embedding = _embedding(config.max_positions, config.width)  # E_pos [77, C]
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        """input_ids: LongTensor [B, N] (N ≤ max_positions, normally 77) → last hidden state [B, N, C].

        clip_skip = k (diffusers' convention, 0 ≤ k < n_layers): stop after block L − k, then LN_final.
        AUTOMATIC1111's "Clip skip: 2" is clip_skip=1 here.
        """
        self._check_input(input_ids, clip_skip)
        input_ids = input_ids.to(self.token_embedding.weight.device)  # the tokenizer returns CPU tensors
        # positions are always 0 … N−1 (the official files also store them as `position_ids`; we don't need to)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.token_embedding(input_ids) + self.position_embedding(positions)  # h⁰ = E_tok[id] + E_pos  [B, N, C]
        n_blocks = len(self.blocks) - (clip_skip or 0)
        for block in self.blocks[:n_blocks]:
            h = block(h)
        return self.final_norm(h)  # out = LN_final(hᴸ⁻ᵏ)

    def _check_input(self, input_ids: torch.Tensor, clip_skip: int | None) -> None:
        config = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an integer tensor [B, N] of token ids, e.g. pipe.tokenizer(texts); "
                            f"got {type(input_ids).__name__}"
                            + (f" of dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else ""))
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, N]; got shape {list(input_ids.shape)} "
                             "(add a batch dimension with input_ids[None])")
        if input_ids.shape[1] > config.max_positions:
            raise ValueError(f"{input_ids.shape[1]} tokens, but the text encoder has only {config.max_positions} "
                             "positions: shorten the prompt (the tokenizer cuts to 77 by default)")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {config.vocab_size}); got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]: was the text tokenized with the "
                             "matching CLIP vocabulary?")
        if clip_skip is not None and not 0 <= clip_skip < config.n_layers:
            raise ValueError(f"clip_skip must be in 0 … {config.n_layers - 1} (diffusers' convention: 1 = the "
                             f"penultimate block, AUTOMATIC1111's 'Clip skip 2'); got {clip_skip}")
