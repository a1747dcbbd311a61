"""ControlNet (Zhang & Agrawala 2023): spatial control of a frozen UNet by a trainable copy of its encoder.

    residuals = ControlNet(x_t, t, context, hint)          hint [B, 3, H, W] in [0, 1] (edge map, pose, depth, …)
    eps_pred  = UNet(x_t, t, context, control=residuals)    the UNet adds them where it reads its skips

Three parts, for SD v1 (model_channels 320, a VAE that downsamples ×8) and a 512² image, 64² latent:

    hint encoder   [B, 3, 512, 512] → 16 → 16 → 32/2 → 32 → 96/2 → 96 → 256/2 → 320     [B, 320, 64, 64]
                   3×3 convs with SiLU between; "/2" = stride 2. One stride-2 stage per factor 2 of the VAE,
                   so the hint lands at the latent's size; the last conv (to model_channels) starts at zero.
    encoder copy   input_conv, the down levels and the middle block of the UNet, built from the same UNetConfig
                   with the same classes (unet.py's DownLevel, Middle); the hint's features are added to the
                   input conv's output: h_0 = input_conv(x_t) + hint_encoder(hint).
    zero convs     one 1×1 convolution per activation the UNet keeps as a skip (12 for SD v1) and one on the
                   middle block's output, all initialised to zero:

                       y = Z(F(x; Θ_c); Θ_z),   Z(h) = W h + b,   W = 0, b = 0 at initialisation   (paper eq 2)

Why training starts as the identity: at step 0 every zero conv outputs 0, so the UNet with control computes
exactly what it computed without (y_c = y, paper eq 3): the frozen model's behaviour is intact and no random noise
is injected into its skips. Yet gradients still flow: ∂Z/∂W = h ≠ 0, so W moves away from zero on the first step,
after which ∂Z/∂h = W ≠ 0 and the copy's weights (initialised from the UNet's, or random for a copy trained from
scratch) start to learn too. The zero-initialised last conv of the hint encoder does the same for h_0.

Scaling (controlnet_scale, guess mode) and the decision which steps use the control are the caller's business
(control.py); this file only computes the residuals: 12 skip residuals and 1 middle residual for SD v1, shaped
like the UNet's skips ([B, 320, 64, 64] … [B, 1280, 8, 8]) and its middle output [B, 1280, 8, 8].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Middle, TimestepMLP, UNetConfig, encoder_levels, timestep_embedding


@dataclass
class ControlNetConfig:
    """The UNet's config (the encoder copy must match the UNet it steers) plus the hint encoder's shape."""
    unet: UNetConfig
    hint_channels: int = 3                              # the control image: RGB (an edge map is grey, stored as RGB)
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)    # widths before and after each stride-2 stage
    downsample_factor: int = 8                          # the VAE's: the hint must end at the latent's size

    def __post_init__(self):
        self.hint_widths = tuple(self.hint_widths)
        stages = self.downsample_factor.bit_length() - 1
        if self.downsample_factor != 2 ** stages or stages < 1:
            raise ValueError(f"ControlNetConfig: downsample_factor must be a power of 2 ≥ 2 (the VAE's), got "
                             f"{self.downsample_factor}")
        if len(self.hint_widths) != stages + 1:
            raise ValueError(f"ControlNetConfig: a VAE downsampling ×{self.downsample_factor} needs {stages} "
                             f"stride-2 stages, so {stages + 1} hint_widths; got {self.hint_widths}")


def zero_conv(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Conv2d:
    """A convolution with W = 0, b = 0: outputs 0 until training moves it (eq 2 in the module docstring)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class HintEncoder(nn.Module):
    """The control image → features at the latent's resolution and the UNet's first width.

    [B, 3, H, W] → conv_in → [B, 16, H, W] → per stage s: conv (w_s → w_s), conv stride 2 (w_s → w_{s+1})
    → [B, w_last, H/f, W/f] → zero conv_out → [B, model_channels, H/f, W/f], SiLU after every conv but the last.
    SD v1: 3 → 16 → 16 → 32/2 → 32 → 96/2 → 96 → 256/2 → 320 (f = 8).
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.stages = nn.ModuleList(
            nn.ModuleList([nn.Conv2d(w, w, 3, padding=1), nn.Conv2d(w, w_next, 3, padding=1, stride=2)])
            for w, w_next in zip(widths[:-1], widths[1:]))
        self.conv_out = zero_conv(widths[-1], out_channels, kernel_size=3)   # starts at 0: no hint at first

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(hint))
        for conv, down in self.stages:
            h = F.silu(down(F.silu(conv(h))))
        return self.conv_out(h)


class ControlNet(nn.Module):
    """forward(x [B, C_in, h, w], t, context [B, 77, D], hint [B, 3, f·h, f·w]) → (skip residuals, middle residual).

    The skip residuals are a list shaped like the UNet's skip stack (12 for SD v1, input conv's first); the
    middle residual is shaped like the middle block's output. Parameter names of the encoder copy are the UNet's
    (time_embedding, input_conv, down.*, middle.*), so a copy can be initialised from a UNet by `from_unet`.
    """

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        c = config.unet
        widths = [c.model_channels * m for m in c.channel_mult]

        self.hint_encoder = HintEncoder(config.hint_channels, config.hint_widths, widths[0])
        # the encoder half of the UNet, built by the same function from the same config (unet.encoder_levels)
        self.time_embedding = TimestepMLP(c.model_channels, c.time_dim)
        self.input_conv = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down, skip_channels = encoder_levels(c)
        ch = skip_channels[-1]
        self.middle = Middle(ch, c)
        # Z(·; Θ_z): one zero 1×1 conv per skip the UNet reads, and one for the middle block's output
        self.zero_convs = nn.ModuleList(zero_conv(width, width) for width in skip_channels)
        self.middle_zero_conv = zero_conv(ch, ch)

    @classmethod
    def from_unet(cls, unet: nn.Module, **hint_options) -> "ControlNet":
        """A ControlNet whose encoder copy starts as the UNet's encoder (the paper's initialisation), zero convs
        and the hint encoder's last conv at zero. hint_options: ControlNetConfig's other fields."""
        controlnet = cls(ControlNetConfig(unet.config, **hint_options))
        own = controlnet.state_dict()
        controlnet.load_state_dict({**own, **{k: v for k, v in unet.state_dict().items() if k in own}})
        return controlnet

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                hint: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embedding(timestep_embedding(t, self.config.unet.model_channels).to(x.dtype))
        guided_hint = self.hint_encoder(hint.to(x.dtype))               # [B, model_channels, h, w]
        if guided_hint.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"ControlNet: the hint {list(hint.shape)} encodes to {list(guided_hint.shape[-2:])}, "
                             f"not the latent's size {list(x.shape[-2:])}: give a control image "
                             f"{self.config.downsample_factor}× the latent's size (the output image's size)")
        h = self.input_conv(x) + guided_hint                            # h_0 = input_conv(x_t) + hint features
        skips = [h]
        for level in self.down:
            h = level(h, emb, context, skips)                           # pushes every activation onto skips
        h = self.middle(h, emb, context)
        down_residuals = [zero(skip) for zero, skip in zip(self.zero_convs, skips)]   # Z(h_i; Θ_z,i)
        return down_residuals, self.middle_zero_conv(h)
