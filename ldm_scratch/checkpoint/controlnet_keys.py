"""The key map of a ControlNet: official (lllyasviel's cldm.py) and diffusers names ↔ ours (controlnet.py).

Official files (control_sd15_*.pth, control_v11*_sd15_*.pth and their .safetensors) hold one flat dictionary under
`control_model.` (some tools strip the prefix; the full "control_sd15_*" files also carry a whole SD v1 model
beside it). Inside, the encoder copy has the UNet's official names, so its blocks are the UNet's key map
(keymap.unet_keymap) restricted to the encoder half; the rest is ControlNet's own:

    control_model.time_embed.*, input_blocks.*, middle_block.*   → the UNet's rules      (time_embedding, down, middle)
    control_model.input_hint_block.{0,2,…,14}.                    → hint_encoder.conv_in, stages.s.{0,1}, conv_out
                                                                    (Sequential: the odd indices are the SiLUs)
    control_model.zero_convs.{i}.0.                               → zero_convs.{i}.      (TimestepEmbedSequential)
    control_model.middle_block_out.0.                             → middle_zero_conv.

diffusers' ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors) is read with the UNet's
diffusers rules plus three of its own: controlnet_cond_embedding.{conv_in, blocks.j, conv_out},
controlnet_down_blocks.{i}, controlnet_mid_block.
"""
from __future__ import annotations

import re
from typing import Iterable

from ..controlnet import ControlNetConfig
from .keymap import KeyMap, Rule, UNetLayout, diffusers_unet_rules, unet_config_from_shapes, unet_keymap

CONTROL_PREFIX = "control_model."
ENCODER_BLOCKS = ("time_embed.", "input_blocks.", "middle_block.")   # the UNet's encoder half and middle


def controlnet_keymap(layout: UNetLayout, n_stages: int) -> KeyMap:
    """Official names (without `control_model.`) of a ControlNet whose UNet has this layout and whose hint
    encoder has `n_stages` stride-2 stages (3 for SD v1: input_hint_block.0 … .14)."""
    encoder = tuple(block for block in unet_keymap(layout).blocks if block[0].startswith(ENCODER_BLOCKS))
    hint = [("input_hint_block.0.", "hint_encoder.conv_in.", ())]
    for s in range(n_stages):                  # conv at 2 + 4s, stride-2 conv at 4 + 4s, SiLUs between
        hint += [(f"input_hint_block.{2 + 4 * s}.", f"hint_encoder.stages.{s}.0.", ()),
                 (f"input_hint_block.{4 + 4 * s}.", f"hint_encoder.stages.{s}.1.", ())]
    hint.append((f"input_hint_block.{2 + 4 * n_stages}.", "hint_encoder.conv_out.", ()))
    zero = (("zero_convs.{}.0.", "zero_convs.{}.", ()), ("middle_block_out.0.", "middle_zero_conv.", ()))
    return KeyMap(encoder + tuple(hint) + zero)


def hint_stages_of_keys(keys: Iterable[str]) -> int:
    """Stride-2 stages of an official hint encoder: its convs sit at 0, 2, …, 2 + 4·S."""
    indices = [int(m[1]) for k in keys if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k))]
    return max(0, (max(indices, default=2) - 2) // 4)


def diffusers_controlnet_rules(n_levels: int = 4) -> list[Rule]:
    """diffusers' ControlNetModel: its own three parts first, then the UNet's rules for the encoder copy."""
    return [
        (r"^controlnet_cond_embedding\.conv_in\.", "hint_encoder.conv_in."),
        (r"^controlnet_cond_embedding\.blocks\.(\d+)\.",
         lambda m: f"hint_encoder.stages.{int(m[1]) // 2}.{int(m[1]) % 2}."),
        (r"^controlnet_cond_embedding\.conv_out\.", "hint_encoder.conv_out."),
        (r"^controlnet_down_blocks\.(\d+)\.", r"zero_convs.\1."),
        (r"^controlnet_mid_block\.", "middle_zero_conv."),
    ] + diffusers_unet_rules(n_levels)


def controlnet_config_from_shapes(shapes: dict[str, tuple], **unet_hints) -> ControlNetConfig:
    """The config, from tensor shapes keyed by our names. The encoder copy's is a UNet config (a ControlNet has no
    output conv: out_channels is the 4 of the UNet it steers); the hint encoder's widths are its convs' outputs.
    unet_hints: what leaves no trace in shapes (n_heads, norm_groups, …), as for unet_config_from_shapes."""
    unet = unet_config_from_shapes({**shapes, "output_conv.weight": (4,)}, **unet_hints)
    n_stages = len({k.split(".")[2] for k in shapes if k.startswith("hint_encoder.stages.")})
    conv_in = shapes["hint_encoder.conv_in.weight"]                   # [16, 3, 3, 3]
    widths = [conv_in[0]] + [shapes[f"hint_encoder.stages.{s}.1.weight"][0] for s in range(n_stages)]
    return ControlNetConfig(unet=unet, hint_channels=conv_in[1], hint_widths=tuple(widths),
                            downsample_factor=2 ** n_stages)
