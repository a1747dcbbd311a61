"""The one attention function shared by the text encoder, the UNet and the VAE.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_head) V                      (Vaswani et al. 2017, eq. 1)

computed per head with PyTorch's fused `scaled_dot_product_attention` (SDPA), which never materialises the
[B, heads, N, M] score matrix when a memory-efficient kernel is available.

Shapes: q [B, N, C], k and v [B, M, C] with C = n_heads · d_head  →  output [B, N, C].

Attention slicing (optional, for small memory): each query row's softmax involves only that row, so the queries
can be processed `chunk` at a time and the results stacked — the same numbers, with at most [B, heads, chunk, M]
scores alive at once where a kernel would otherwise materialise all N × M of them (e.g. SDPA's plain "math" path
on some GPUs: 2 · 8 · 4096² floats = 1 GiB for the UNet's first level at 512²). Turn it on for every call with
`set_attention_slicing(chunk)` or per call with `chunk=`.

Hooks (for looking inside and editing, ldm_scratch/editing/): the UNet's and CLIP's attention modules pass
themselves as `layer=`; `with hooks(pipe.unet, fn):` tags every attention layer of the model with a `LayerInfo`
(its name, level, place and kind, found from `named_modules()`), and while the block runs each tagged call takes
the explicit path instead of the fused kernel:

    probs = softmax(Q Kᵀ / √d_head + M)            [B, heads, N, M]   (materialised: the hook needs it)
    probs = fn(layer, kind, q, k, v, probs) or probs                    (the hook may read or replace it)
    out   = probs V

With no hook set, a call costs one extra check (`layer is not None and _hooked`) and takes the fused path as
before: the same kernel, the same numbers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

_default_chunk: int | None = None   # set by set_attention_slicing(); None: all queries at once


def set_attention_slicing(chunk: int | None) -> None:
    """Process queries `chunk` at a time in every attention call that passes no `chunk=` (None: off)."""
    global _default_chunk
    if chunk is not None and chunk < 1:
        raise ValueError(f"attention slicing chunk must be a positive number of queries or None, got {chunk}")
    _default_chunk = chunk


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int,
              causal: bool = False, chunk: int | None = None, layer: nn.Module | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention on already-projected q, k, v.

    q: [B, N, C], k/v: [B, M, C] → [B, N, C]. `causal=True` lets token i attend only to tokens ≤ i
    (the CLIP text transformer is a causal language model). `chunk`: queries per slice (default: the value of
    `set_attention_slicing`, normally None = no slicing). `layer`: the calling module, so that a hook set on it
    with `hooks()` can see and edit its attention probabilities.
    """
    chunk = chunk if chunk is not None else _default_chunk
    # split the channels into heads: [B, N, heads·d] → [B, heads, N, d] (views, no copies)
    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=n_heads) for x in (q, k, v))
    if layer is not None and _hooked:                # the only cost of hooks when none is set
        hooked = _hooked.get(layer)
        if hooked is not None:
            return rearrange(_hooked_attention(q, k, v, causal, *hooked), "b h n d -> b n (h d)")
    n_queries = q.shape[2]
    if chunk is None or chunk >= n_queries:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # softmax(QKᵀ/√d)·V per head
        return rearrange(out, "b h n d -> b n (h d)")

    # Sliced: write each slice into an output stored as [B, N, heads, d], so that the final merge of the heads
    # is a view rather than a copy.
    batch, heads, _, d_head = q.shape
    out = q.new_empty(batch, n_queries, heads, d_head)
    for start in range(0, n_queries, chunk):
        rows = slice(start, start + chunk)
        mask = None
        if causal:  # query i (absolute position start + r) sees keys j ≤ i
            positions = torch.arange(start, min(start + chunk, n_queries), device=q.device)
            mask = torch.arange(k.shape[2], device=q.device)[None, :] <= positions[:, None]
        out[:, rows] = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask).transpose(1, 2)
    return rearrange(out, "b n h d -> b n (h d)")


# ---------------------------------------------------------------------------------------------------------------
# Hooks: read or replace the attention probabilities of named layers
# ---------------------------------------------------------------------------------------------------------------

# Which modules are attention layers, and of which kind, by the last part of their name in `named_modules()`:
# the UNet's TransformerBlock has `self_attn` and `cross_attn` (spatial_transformer.py), CLIP's Block has `attn`
# (clip.py, causal self-attention). A module must also have `n_heads` (so a stray `attn` container is skipped).
KIND_BY_NAME = {"self_attn": "self", "cross_attn": "cross", "attn": "self"}


@dataclass
class LayerInfo:
    """What a hook knows about the layer it is called from.

    name: the module's name in the hooked model, e.g. "up.1.attn.2.blocks.0.cross_attn" or "blocks.3.attn".
    place: "down", "middle" or "up" for the UNet (its first name part), "text" for anything else (CLIP).
    level: the UNet resolution level (0 = full latent size; each level halves it; the middle block sits at the
        lowest), None outside the UNet. kind: "self" or "cross".
    tokens: the query count N = h·w of the current call (set from q's shape at call time; for the UNet the
        feature map is the latent downsampled 2^level times, so h·w = N).
    """
    name: str
    place: str
    level: int | None
    kind: str
    tokens: int = 0


_hooked: dict[nn.Module, tuple[LayerInfo, object]] = {}   # module → (its info, the hook); empty: no hooks at all


def attention_layers(model: nn.Module) -> list[tuple[nn.Module, LayerInfo]]:
    """Every attention layer of `model` with its LayerInfo, in `named_modules()` order (for the UNet: down, middle,
    up.0, up.1, … — not the order they run in, which takes the up levels from the lowest resolution up)."""
    n_down = len(getattr(model, "down", ()))                  # the UNet's levels; the middle block is at the lowest
    layers = []
    for name, module in model.named_modules():
        kind = KIND_BY_NAME.get(name.rsplit(".", 1)[-1])
        if kind is None or not hasattr(module, "n_heads"):
            continue
        parts = name.split(".")
        if parts[0] in ("down", "up"):
            place, level = parts[0], int(parts[1])
        elif parts[0] == "middle":
            place, level = "middle", n_down - 1
        else:
            place, level = "text", None
        layers.append((module, LayerInfo(name, place, level, kind)))
    return layers


def is_hooked(layer: nn.Module) -> bool:
    """Whether a `hooks()` block has hooked this attention module (its calls then take the explicit path)."""
    return layer in _hooked


@contextlib.contextmanager
def hooks(model: nn.Module, fn, where=None):
    """Call `fn(layer, kind, q, k, v, probs)` from every attention layer of `model` while the block runs.

    q [B, heads, N, d], k and v [B, heads, M, d], probs = softmax(Q Kᵀ/√d (+ causal mask)) [B, heads, N, M].
    fn returns None (only looking) or a tensor of probs' shape that replaces them (editing).
    where(layer) -> bool: hook only the layers it accepts (default all). Hooks nest: an inner `hooks()` on the same
    layers takes over and the outer one returns when it exits.
    """
    layers = [(module, info) for module, info in attention_layers(model) if where is None or where(info)]
    if not layers:
        raise ValueError(f"hooks(): {type(model).__name__} has no attention layer to hook (modules named "
                         f"{sorted(KIND_BY_NAME)} with an `n_heads`); pass pipe.unet or pipe.text_encoder")
    previous = {module: _hooked.get(module) for module, _ in layers}
    _hooked.update({module: (info, fn) for module, info in layers})
    try:
        yield [info for _, info in layers]
    finally:
        for module, before in previous.items():
            if before is None:
                _hooked.pop(module, None)
            else:
                _hooked[module] = before


def _hooked_attention(q, k, v, causal: bool, layer: LayerInfo, fn) -> torch.Tensor:
    """The explicit path for a hooked layer: q [B, heads, N, d], k/v [B, heads, M, d] → [B, heads, N, d]."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5               # Q Kᵀ / √d_head   [B, heads, N, M]
    if causal:                                                           # + M: −∞ above the diagonal (j > i)
        n, m = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    probs = scores.softmax(dim=-1)
    layer.tokens = q.shape[2]
    replaced = fn(layer, layer.kind, q, k, v, probs)
    if replaced is not None:
        if not isinstance(replaced, torch.Tensor):
            raise TypeError(f"the attention hook returned a {type(replaced).__name__} for layer {layer.name}; "
                            "it must return None (only looking) or a tensor of new probabilities")
        if replaced.shape != probs.shape:
            raise ValueError(f"the attention hook returned probabilities of shape {tuple(replaced.shape)} for layer "
                             f"{layer.name}; they must keep the shape {tuple(probs.shape)}")
        probs = replaced.to(v.dtype)
    return probs @ v                                                     # softmax(·) V
