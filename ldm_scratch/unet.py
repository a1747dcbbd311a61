"""The denoising network of Stable Diffusion v1: a conditional UNet that predicts the noise in a latent.

    eps_pred = UNet(x_t, t, context)

x_t [B, 4, h, w] is a noisy latent (h = w = 64 for a 512² image), t the diffusion timestep (0…999, int or float),
context [B, 77, 768] the CLIP text encoder's last hidden state. The output eps_pred [B, 4, h, w] estimates the
noise ε that the forward process q(x_t | x_0) mixed into x_0:  x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε.
The inpainting model takes 9 input channels: the 4 latent channels, 1 mask channel and the 4 channels of the
masked image's latent, concatenated; everything after the first convolution is the same. The SD 2 ×4 upscaler
takes 7 (the latent and the noised low-resolution RGB image) and one more input, its noise level n as a class
label: emb = MLP(timestep_embedding(t)) + label_emb[n] (UNetConfig.num_classes); its high-resolution levels have
no self-attention (UNetConfig.disable_self_attention, spatial_transformer.TransformerBlock).

Shapes through the levels at full size (SD v1: model_channels 320, channel_mult 1, 2, 4, 4), for a 64×64 latent:

    input_conv                 [B,    4, 64, 64] → [B,  320, 64, 64]
    down.0  2×(res, attn) ↓    [B,  320, 64, 64] → [B,  320, 32, 32]
    down.1  2×(res, attn) ↓    [B,  320, 32, 32] → [B,  640, 16, 16]
    down.2  2×(res, attn) ↓    [B,  640, 16, 16] → [B, 1280,  8,  8]
    down.3  2×res              [B, 1280,  8,  8] → [B, 1280,  8,  8]
    middle  res, attn, res     [B, 1280,  8,  8] → [B, 1280,  8,  8]
    up.3    3×res ↑            [B, 1280,  8,  8] → [B, 1280, 16, 16]
    up.2    3×(res, attn) ↑    [B, 1280, 16, 16] → [B, 1280, 32, 32]
    up.1    3×(res, attn) ↑    [B, 1280, 32, 32] → [B,  640, 64, 64]
    up.0    3×(res, attn)      [B,  640, 64, 64] → [B,  320, 64, 64]
    output_norm, SiLU, output_conv                 → [B,    4, 64, 64]

`up.i` mirrors `down.i` (same resolution, same width) and runs in the reverse order. Every activation the encoder
half produces (12 of them: the input conv's, each res/attn pair's, each downsample's) is kept and concatenated
onto the channels of one decoder ResBlock — the UNet's skip connections; that is why the up levels have one more
ResBlock than the down levels and why their ResBlocks take e.g. 1280 + 640 = 1920 channels.

The timestep enters every ResBlock (as a per-channel bias), the prompt enters every SpatialTransformer (through
cross-attention): each latent pixel asks "which words are about me?" and pulls in their embeddings. Dropout is left
out (SD v1 trains with dropout 0).

Parameter names are ours; the key map in checkpoint/keymap.py names the official CompVis blocks for any topology,
and DIFFUSERS_UNET_RULES there the diffusers ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .spatial_transformer import SpatialTransformer, TransformerBlock  # noqa: F401  (TransformerBlock: kept importable here)


@dataclass
class UNetConfig:
    """SD v1.x UNet (v1-inference.yaml: `unet_config`). Defaults are the real model: 859,520,964 parameters."""
    in_channels: int = 4                 # 4 latent channels; 9 for the inpainting model (latent + mask + masked latent)
    out_channels: int = 4                # eps_pred has the latent's shape
    model_channels: int = 320            # width of the first level; the timestep embedding has this many channels
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)   # width of level i = model_channels · channel_mult[i]
    num_res_blocks: int = 2              # ResBlocks per down level (up levels have one more, for the extra skip)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with a SpatialTransformer after each ResBlock
    n_heads: int = 8                     # attention heads (SD v1 fixes the count; d_head = width / 8 = 40, 80, 160)
    transformer_depth: int = 1           # transformer blocks per SpatialTransformer
    context_dim: int = 768               # width of the text encoder's output (CLIP ViT-L/14; 1024 for SD 2's OpenCLIP)
    norm_groups: int = 32                # GroupNorm groups everywhere
    # SD 2.x (v2-inference-v.yaml) differs from SD v1 only in these three switches (and context_dim = 1024):
    head_dim: int | None = None          # SD 2: 64-channel heads, heads = width / 64 = 5, 10, 20 (overrides n_heads)
    linear_projection: bool = False      # SD 2: the SpatialTransformer's proj_in/proj_out are Linear [C, C]
    upcast_attention: bool = False       # SD 2.1: attention in float32 when the UNet runs in half precision
    # A full LCM UNet (Luo et al. 2023: distilled with the guidance scale as an input, no CFG) adds one Linear:
    guidance_embed_dim: int | None = None  # width of its guidance-scale embedding (256; diffusers' time_cond_proj_dim)
    # The SD 2 ×4 upscaler (x4-upscaling.yaml) adds a class label and turns self-attention off where it is costly:
    num_classes: int | None = None       # label_emb = Embedding(1000, 1024): the low-res image's noise level
    disable_self_attention: tuple[int, ...] = ()   # levels whose attn1 reads the context (disable_self_attentions)
    disable_middle_self_attention: bool = False    # the same for the middle block (disable_middle_self_attn)

    def __post_init__(self):
        self.channel_mult, self.attention_levels = tuple(self.channel_mult), tuple(self.attention_levels)
        self.disable_self_attention = tuple(self.disable_self_attention)
        split = f"head_dim={self.head_dim}" if self.head_dim else f"n_heads={self.n_heads}"
        for width in (self.model_channels * m for m in self.channel_mult):
            if width % self.norm_groups or width % (self.head_dim or self.n_heads):
                raise ValueError(f"UNetConfig: level width {width} must be divisible by norm_groups="
                                 f"{self.norm_groups} and {split}; choose model_channels accordingly "
                                 "(e.g. a multiple of 32).")

    def heads(self, width: int) -> int:
        """Attention heads at a level of this width: SD v1 fixes the count (8), SD 2 the head size (64)."""
        return width // self.head_dim if self.head_dim else self.n_heads

    @property
    def time_dim(self) -> int:
        """Width of the timestep MLP's output, 4 · model_channels (1280)."""
        return 4 * self.model_channels


# ---------------------------------------------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int = 320, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the timestep, as the Transformer's position encoding (Vaswani et al. 2017):

        freq_i = max_period^(−i / (dim/2)),  i = 0 … dim/2 − 1
        emb(t) = [cos(t · freq_0), …, cos(t · freq_{dim/2−1}), sin(t · freq_0), …, sin(t · freq_{dim/2−1})]

    t: [B] (int or float; fractional t is fine, σ-samplers use it) → [B, dim] float32. The cos half comes first
    (the CompVis order; diffusers calls this `flip_sin_to_cos=True`).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]                      # [B, dim/2]: t · freq_i
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def guidance_embedding(w: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """What a full LCM UNet reads the guidance scale w through (LCM's w-conditioning, after VDM's embedding):

        freq_i = max_period^(−i / (dim/2 − 1)),  i = 0 … dim/2 − 1        (note dim/2 − 1: freq_last = 1/max_period)
        emb(w) = [sin((w − 1)·1000 · freq_i) …, cos((w − 1)·1000 · freq_i) …]       (sin first, unlike the timestep's)

    w: [B] the classifier-free guidance scale as users give it (LCM's w is ours − 1: diffusers' LCM pipeline
    passes guidance_scale − 1) → [B, dim] float32. The frequencies are computed in float32 as the reference does:
    at (w − 1)·1000 = 7000 one float32 rounding of a frequency would move the angle by ~4e-4.
    """
    half = dim // 2
    step = torch.log(torch.tensor(max_period, dtype=torch.float32)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -step)
    angles = ((w.float() - 1) * 1000.0)[:, None] * freqs[None, :]       # [B, dim/2]
    return F.pad(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1), (0, dim % 2))   # odd dim: a zero column


class TimestepMLP(nn.Module):
    """emb = Linear(SiLU(Linear(timestep_embedding(t)))): [B, 320] → [B, 1280], shared by every ResBlock.

    A full LCM UNet (guidance_dim set) first adds the guidance scale, projected to the timestep embedding's width:
    t_emb + guidance_proj(guidance_embedding(w)), guidance_proj a bias-free Linear [256 → 320] ("cond_proj").
    """

    def __init__(self, in_dim: int, time_dim: int, guidance_dim: int | None = None):
        super().__init__()
        self.guidance_proj = nn.Linear(guidance_dim, in_dim, bias=False) if guidance_dim else None
        self.linear1 = nn.Linear(in_dim, time_dim)
        self.linear2 = nn.Linear(time_dim, time_dim)

    def forward(self, t_emb: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """t_emb [B, 320] (timestep_embedding), guidance [B] the scale w (full LCM UNet only) → [B, 1280]."""
        if (guidance is None) != (self.guidance_proj is None):
            raise ValueError("a full LCM UNet needs the guidance scale (UNet(x, t, context, guidance=w)); other UNets "
                             "take none (their guidance is classifier-free guidance, in the pipeline)"
                             if guidance is None else "this UNet has no guidance embedding (not a full LCM "
                             "UNet): leave guidance=None and apply the scale by classifier-free guidance")
        if guidance is not None:
            w_emb = guidance_embedding(guidance, self.guidance_proj.in_features).to(t_emb.dtype)   # [B, 256]
            t_emb = t_emb + self.guidance_proj(w_emb)                    # [B, 320] + [B, 320]
        return self.linear2(F.silu(self.linear1(t_emb)))


# ---------------------------------------------------------------------------------------------------------------
# ResBlock: convolutions that see the timestep
# ---------------------------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (Ho et al. 2020, after Wide ResNets):

        h   = conv1(SiLU(GroupNorm(x)))                       [B, C_out, h, w]
        h   = h + time_proj(SiLU(emb))[:, :, None, None]      the timestep as a per-channel bias
        h   = conv2(SiLU(GroupNorm(h)))
        out = skip(x) + h                                     skip: 1×1 conv when C_in ≠ C_out, else identity

    x [B, C_in, h, w], emb [B, 1280] → [B, C_out, h, w].
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # The in-place ops (silu_, +=, add_) write into tensors this block has just created and nobody else holds:
        # the same numbers as the out-of-place forms, without a fresh full-size buffer for each (speed and memory
        # on CPU). GroupNorm's output is never needed again, so SiLU may overwrite it.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h += self.time_proj(F.silu(emb))[:, :, None, None]           # [B, C_out] broadcast over h × w
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.skip(x))                                  # skip(x) + h


# ---------------------------------------------------------------------------------------------------------------
# The levels of the UNet
# ---------------------------------------------------------------------------------------------------------------

def spatial_transformer(width: int, c: UNetConfig, self_attends: bool = True) -> SpatialTransformer:
    """The SpatialTransformer of a level of this width, as the config says (SD v1 or SD 2 style; self_attends=False:
    the ×4 upscaler's cross-attention-only blocks, spatial_transformer.TransformerBlock)."""
    return SpatialTransformer(width, c.heads(width), c.context_dim, c.transformer_depth, c.norm_groups,
                              linear=c.linear_projection, upcast=c.upcast_attention, self_attends=self_attends)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 (to the size of the skip it will meet, so odd sizes work), then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownLevel(nn.Module):
    """One resolution of the encoder half: `n_res` × (ResBlock [→ SpatialTransformer]), then a stride-2 conv
    that halves h and w (absent at the last level). Pushes every output onto `skips` for the decoder half."""

    def __init__(self, in_channels: int, width: int, config: UNetConfig, attention: bool, downsample: bool,
                 self_attends: bool = True):
        super().__init__()
        c = config
        self.res = nn.ModuleList(ResBlock(in_channels if j == 0 else width, width, c.time_dim, c.norm_groups)
                                 for j in range(c.num_res_blocks))
        self.attn = nn.ModuleList(
            spatial_transformer(width, c, self_attends) for _ in range(c.num_res_blocks)) if attention else None
        self.downsample = nn.Conv2d(width, width, 3, stride=2, padding=1) if downsample else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                skips: list[torch.Tensor]) -> torch.Tensor:
        for j, res in enumerate(self.res):
            x = res(x, emb)
            if self.attn is not None:
                x = self.attn[j](x, context)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x


class Middle(nn.Module):
    """The bottleneck at the lowest resolution: ResBlock → SpatialTransformer → ResBlock, [B, 1280, h/8, w/8]."""

    def __init__(self, width: int, config: UNetConfig):
        super().__init__()
        c = config
        self.res1 = ResBlock(width, width, c.time_dim, c.norm_groups)
        self.attn = spatial_transformer(width, c, self_attends=not c.disable_middle_self_attention)
        self.res2 = ResBlock(width, width, c.time_dim, c.norm_groups)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, emb), context), emb)


class UpLevel(nn.Module):
    """One resolution of the decoder half: (n_res + 1) × (concat a skip → ResBlock [→ SpatialTransformer]), then
    upsample (absent at the top level). `skip_channels[j]` is the width of the skip the j-th ResBlock receives."""

    def __init__(self, in_channels: int, width: int, skip_channels: list[int], config: UNetConfig,
                 attention: bool, upsample: bool, self_attends: bool = True):
        super().__init__()
        c = config
        inputs = [in_channels] + [width] * (len(skip_channels) - 1)
        self.res = nn.ModuleList(ResBlock(ch + skip, width, c.time_dim, c.norm_groups)
                                 for ch, skip in zip(inputs, skip_channels))
        self.attn = nn.ModuleList(
            spatial_transformer(width, c, self_attends) for _ in skip_channels) if attention else None
        self.upsample = Upsample(width) if upsample else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                skips: list[torch.Tensor]) -> torch.Tensor:
        for j, res in enumerate(self.res):
            x = res(torch.cat([x, skips.pop()], dim=1), emb)    # [B, C + C_skip, h, w]
            if self.attn is not None:
                x = self.attn[j](x, context)
        if self.upsample is not None:
            x = self.upsample(x, size=skips[-1].shape[-2:])
        return x


def encoder_levels(c: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder half's levels (the UNet's, and the copy a ControlNet trains), and the width of every activation
    it pushes onto the skip stack, the input conv's first: SD v1 [320, 320, 320, 320, 640, 640, 640, 1280, 1280,
    1280, 1280, 1280] (12 skips; the last level has no downsample)."""
    widths = [c.model_channels * m for m in c.channel_mult]
    last = len(widths) - 1
    skip_channels, ch = [widths[0]], widths[0]
    levels = nn.ModuleList()
    for level, width in enumerate(widths):
        levels.append(DownLevel(ch, width, c, level in c.attention_levels, downsample=level != last,
                                self_attends=level not in c.disable_self_attention))
        skip_channels += [width] * (c.num_res_blocks + (level != last))
        ch = width
    return levels, skip_channels


class UNet(nn.Module):
    """The noise predictor: forward(x [B, C_in, h, w], t [B] or scalar, context [B, 77, D]) → eps_pred [B, 4, h, w].

    h and w are best multiples of 8 (three halvings); other sizes work, the upsamples follow the skips' sizes.
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = c = config or UNetConfig()
        widths = [c.model_channels * m for m in c.channel_mult]          # SD v1: 320, 640, 1280, 1280

        self.time_embedding = TimestepMLP(c.model_channels, c.time_dim, c.guidance_embed_dim)
        # ×4 upscaler: one learnt row [time_dim] per class label (its noise level), added to the timestep's embedding
        self.class_embedding = nn.Embedding(c.num_classes, c.time_dim) if c.num_classes else None
        self.input_conv = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)

        self.down, skip_channels = encoder_levels(c)                     # the encoder half
        ch = skip_channels[-1]
        self.middle = Middle(ch, c)

        # the decoder half, built deepest first (the order it runs in, popping the skip stack), stored by level
        up = {}
        for level in reversed(range(len(widths))):
            skips = [skip_channels.pop() for _ in range(c.num_res_blocks + 1)]
            up[level] = UpLevel(ch, widths[level], skips, c, level in c.attention_levels, upsample=level != 0,
                                self_attends=level not in c.disable_self_attention)
            ch = widths[level]
        self.up = nn.ModuleList(up[level] for level in range(len(widths)))

        self.output_norm = nn.GroupNorm(c.norm_groups, ch)
        self.output_conv = nn.Conv2d(ch, c.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                control: tuple[list[torch.Tensor], torch.Tensor] | None = None,
                guidance: torch.Tensor | float | None = None,
                class_labels: torch.Tensor | int | None = None) -> torch.Tensor:
        """control: a ControlNet's (skip residuals, middle residual), already scaled (controlnet.py): each residual
        is added to the activation the UNet reads it with, as cldm.py does: skip_i + r_i, middle + r_mid.
        class_labels: the ×4 upscaler's noise level, an int or [B] in [0, num_classes) (UNet with num_classes)."""
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet expects {self.config.in_channels} input channels, got x of shape "
                             f"{list(x.shape)}" + {9: " (the inpainting model takes 9: latent, mask, masked-image "
                                                      "latent)", 7: " (the ×4 upscaler takes 7: latent, low-res "
                                                      "image)"}.get(self.config.in_channels, ""))
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        if t.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"t must be a scalar or have one entry per sample ({x.shape[0]}), got {t.shape[0]}")
        t = t.expand(x.shape[0])

        if guidance is not None:                     # a full LCM UNet's guidance scale w, one per sample: [B]
            guidance = torch.as_tensor(guidance, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embedding(timestep_embedding(t, self.config.model_channels).to(x.dtype), guidance)   # [B, 1280]
        if self.class_embedding is not None or class_labels is not None:
            emb = emb + self._class_embedding(class_labels, x.shape[0]).to(emb.dtype)   # emb = emb + label_emb(y)
        h = self.input_conv(x)
        skips = [h]
        for level in self.down:
            h = level(h, emb, context, skips)
        h = self.middle(h, emb, context)
        if control is not None:                      # ControlNet: the residuals join the skips and the middle
            down_residuals, middle_residual = control
            skips = [skip + residual for skip, residual in zip(skips, down_residuals, strict=True)]
            h = h + middle_residual
        for level in reversed(self.up):
            h = level(h, emb, context, skips)
        return self.output_conv(F.silu(self.output_norm(h), inplace=True))

    def _class_embedding(self, labels, batch: int) -> torch.Tensor:
        """label_emb(y) [B, time_dim] for integer labels y (scalar or [B]), checked against the embedding's rows."""
        if self.class_embedding is None or labels is None:
            raise ValueError("this UNet has no class embedding (num_classes): leave class_labels=None"
                             if labels is not None else f"this UNet takes a class label (num_classes="
                             f"{self.config.num_classes}; the ×4 upscaler's noise level): pass class_labels=")
        labels = torch.as_tensor(labels, device=self.class_embedding.weight.device).reshape(-1)
        n = self.config.num_classes
        if labels.is_floating_point() or labels.shape[0] not in (1, batch) or not ((0 <= labels) & (labels < n)).all():
            raise ValueError(f"class_labels must be whole numbers in [0, {n}), one or one per sample ({batch}), "
                             f"got {labels.tolist()}")
        return self.class_embedding(labels.expand(batch))
