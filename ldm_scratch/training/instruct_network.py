"""The network a tiny InstructPix2Pix trains (training/instruct.py has the recipe): the text-to-image UNet widened
to read the image to edit, and the handles the recipe turns on it.

- `widen_input`: the first convolution takes cat[z_t, c_I], 8 channels, the 4 new ones zero (Brooks et al. §3.2);
- `InstructEps`: text encoder + UNet as one module, reading k·c_I (`fold_image_scale` puts k into the weights);
- `copy_image_init`, `freeze_text_keys_values`: a start and a freezing the recipe can choose;
- `input_weight_sizes`: how far the image pathway grew.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..configs import ModelConfig
from ..unet import UNet


def instruct_config(config: ModelConfig, prediction_type: str | None = None, zero_snr: bool = False
                    ) -> ModelConfig:
    """The base model's config with a 2·z-channel UNet input (latents + image latents) and its own name;
    prediction_type: what the trained UNet will output ("epsilon" or "v_prediction"; None = the base model's), so
    that the saved file tells the samplers (diffusion.eps_and_x0); zero_snr: the β schedule rescaled so that
    ᾱ_T = 0 (diffusion.rescale_zero_terminal_snr), likewise recorded in the file."""
    unet = dataclasses.replace(config.unet, in_channels=2 * config.latent_channels)
    return dataclasses.replace(config, unet=unet, name=f"{config.name}-instruct",
                               prediction_type=prediction_type or config.prediction_type,
                               rescale_zero_terminal_snr=zero_snr or config.rescale_zero_terminal_snr)


@torch.no_grad()
def widen_input(unet: UNet, in_channels: int) -> UNet:
    """A copy of `unet` whose first convolution takes `in_channels` inputs: the old weights for the first
    C_old channels, zeros for the new ones (Brooks et al. §3.2), so

        UNet_wide(cat[z_t, c_I], t, c) = UNet(z_t, t, c)   for every c_I, as long as the new weights are 0.

    input_conv.weight [C_out, C_old, 3, 3] → [C_out, in_channels, 3, 3]; every other tensor is copied as is."""
    old = unet.config.in_channels
    if unet.config.in_channels != unet.config.out_channels:
        raise ValueError(f"the UNet to widen must be a text-to-image UNet ({unet.config.out_channels} input "
                         f"channels), it takes {old}: it is already an instruct or inpainting model")
    if in_channels <= old:
        raise ValueError(f"in_channels={in_channels} does not widen a UNet of {old} input channels")
    wide = UNet(dataclasses.replace(unet.config, in_channels=in_channels))
    state = unet.state_dict()
    weight = state["input_conv.weight"]
    extra = weight.new_zeros(weight.shape[0], in_channels - old, *weight.shape[2:])
    state["input_conv.weight"] = torch.cat([weight, extra], dim=1)        # [C_out, C_old + new, 3, 3], new = 0
    wide.load_state_dict(state)
    return wide.to(weight.dtype).train(unet.training)


class InstructEps(nn.Module):
    """ε_θ(z_t, t, c_I, c_T(ids)) → [B, 4, h, w]: the text encoder and the 8-channel UNet as one module (DDP).

    image_scale k: the UNet reads k·c_I in training, and `fold_image_scale` multiplies the image weights by k
    before saving, so the saved model reads c_I as pipe.instruct gives it (W_I·(k·c_I) = (k·W_I)·c_I). Why:
    AdamW moves every weight by about lr per step whatever the size of its gradient, so this is the same network
    with a k-times larger learning rate (and weight decay) on the image weights only — the zero-initialised image
    channels start far behind the noise channels (|w| ≈ 0.09), and k lets them catch up. k = 1 is the paper."""

    def __init__(self, text_encoder: nn.Module, unet: UNet, image_scale: float = 1.0):
        super().__init__()
        self.text_encoder, self.unet, self.image_scale = text_encoder, unet, image_scale

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, c_image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z_t, self.image_scale * c_image], dim=1)                          # [B, 8, h, w] in
        return self.unet(x, t, self.text_encoder(ids))


@torch.no_grad()
def copy_image_init(unet: UNet, beta: float, latent_scale: float, latent_channels: int) -> None:
    """W_I = β · latent_scale · W_z: the first convolution's image weights start as a small copy of its noise
    weights, so the widened UNet first sees

        W_z z_t + W_I c_I = W_z (z_t + β·z_src),   z_src = latent_scale · c_I (the source, at the model's scale).

    Why (a departure from the paper's zero start, which makes step 0 exactly the old model): at high noise
    z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε holds the layout only at √ᾱ_t ≈ 0.07–0.2 (t ≥ 770), and the pretrained network already
    reads a layout there; adding β·z_src with β of that size shows it the source's layout in the form it knows,
    from the first step, instead of waiting for zero weights to grow (they stayed ~35× smaller than W_z in the plain
    run). At low noise β·z_src is a small error (z_t ≈ z_0 already) that training removes. β = 0: the paper."""
    weight = unet.input_conv.weight
    weight[:, latent_channels:] = beta * latent_scale * weight[:, :latent_channels]


@torch.no_grad()
def fold_image_scale(unet: UNet, image_scale: float, latent_channels: int) -> None:
    """input_conv.weight[:, C:] *= k (C = latent channels): the trained network of InstructEps(k), reading c_I."""
    unet.input_conv.weight[:, latent_channels:] *= image_scale


def freeze_text_keys_values(unet: UNet) -> list[str]:
    """Stop training W_K and W_V of every cross-attention (K = context·W_K, V = context·W_V): with the text
    encoder also frozen, what a word contributes to the UNet stays what the base text-to-image model learned for
    it ("yellow" next to "background" → a yellow background), and only where each pixel looks (W_Q) and what it
    does with what it reads (W_out, the rest of the UNet) train. Returns the frozen parameters' names.

    Why it was tried (round 5): trained freely, the model learned which results follow each instruction in the
    training pairs — "change the background to yellow" never produced a star there, and on an unseen star it drew a
    circle or square (validation triples). Measured: with ε-prediction it did not help (kept 73–80 % against 77–81 %
    trained freely, edits weaker), the image then being read too imprecisely from pure noise for it to matter; with
    v-prediction (round 6) it did: kept 88.0 % against 85.3 %, and that star kept in 19 of 23 cases against 8."""
    frozen = []
    for name, parameter in unet.named_parameters():
        if ".cross_attn.to_k." in name or ".cross_attn.to_v." in name:
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def input_weight_sizes(unet: UNet, latent_channels: int) -> dict[str, float]:
    """mean |w| of the first convolution on the noise channels and on the image channels (how far the image
    pathway grew from its zero start)."""
    weight = unet.input_conv.weight.detach()
    return {"noise_channels": weight[:, :latent_channels].abs().mean().item(),
            "image_channels": weight[:, latent_channels:].abs().mean().item()}
