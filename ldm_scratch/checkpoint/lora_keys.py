"""LoRA file names → the module of ours each LoRA tensor updates.

A LoRA file names the layer it changes by the layer's name in the model its trainer held, and every trainer held
diffusers' UNet2DConditionModel and transformers' CLIPTextModel. Three spellings are common:

    kohya / AUTOMATIC1111   lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
                            lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight      (+ .alpha)
    diffusers / PEFT        unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
                            text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight
    diffusers, older        down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight
                            unet.….to_q.lora.down.weight, text_encoder.….q_proj.lora_linear_layer.up.weight
    LyCORIS LoHa / LoKr     lora_unet_….hada_w1_a, .hada_w2_b, …   lora_unet_….lokr_w1, .lokr_w2_a, …   (kohya names)

kohya's name is the diffusers module path with every `.` written `_`. Splitting it back on `_` is guesswork
(`down_blocks`, `to_q`, `time_emb_proj`, `linear_1` hold underscores of their own), so the map goes the other way:
for every Linear and Conv2d of our networks we compute its diffusers path, and both spellings of that path become
keys of a lookup table. Looking a name up either finds exactly one module or finds none (an error listing it).

Our UNet module → diffusers path: `UNET_MODULE_RULES` below renames ours into diffusers' spelling, and every name it
produces is run back through keymap.py's `diffusers_unet_rules` (the table the folder loader uses): the two must
give back our name, so the tables cannot drift apart. The text encoder's names are transformers' own, which
keymap.py's two-way `CLIP_RULES` already writes (`to_official`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .keymap import CLIP_RULES, Rule, diffusers_unet_rules, rename
from .tensor_file import CheckpointError

NETWORKS = ("unet", "text_encoder")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def unet_module_rules(n_levels: int = 4) -> list[Rule]:
    """Our UNet's parameter names → diffusers', the inverse of keymap.diffusers_unet_rules (checked against it in
    `diffusers_unet_module`). e.g. up.2.attn.1.blocks.0.cross_attn.to_k.weight →
    up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight
    (SD v1: our up.l is diffusers' up_blocks.(3 − l))."""
    up = lambda m: n_levels - 1 - int(m[1])
    return [
        (r"^input_conv\.", "conv_in."),
        (r"^time_embedding\.linear([12])\.", r"time_embedding.linear_\1."),
        (r"^down\.(\d+)\.res\.", r"down_blocks.\1.resnets."),
        (r"^down\.(\d+)\.attn\.", r"down_blocks.\1.attentions."),
        (r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0.conv."),
        (r"^middle\.res([12])\.", lambda m: f"mid_block.resnets.{int(m[1]) - 1}."),
        (r"^middle\.attn\.", "mid_block.attentions.0."),
        (r"^up\.(\d+)\.res\.", lambda m: f"up_blocks.{up(m)}.resnets."),
        (r"^up\.(\d+)\.attn\.", lambda m: f"up_blocks.{up(m)}.attentions."),
        (r"^up\.(\d+)\.upsample\.", lambda m: f"up_blocks.{up(m)}.upsamplers.0."),
        (r"^output_norm\.", "conv_norm_out."),
        (r"^output_conv\.", "conv_out."),
        (r"\.time_proj\.", ".time_emb_proj."),
        (r"\.skip\.", ".conv_shortcut."),
        (r"\.blocks\.", ".transformer_blocks."),
        (r"\.self_attn\.", ".attn1."),
        (r"\.cross_attn\.", ".attn2."),
        (r"\.to_out\.", ".to_out.0."),
        (r"\.ff\.geglu\.", ".ff.net.0.proj."),
        (r"\.ff\.out\.", ".ff.net.2."),
    ]


def diffusers_unet_module(ours: str, n_levels: int = 4) -> str:
    """diffusers' path of one of our UNet modules, e.g. down.0.res.1.time_proj → down_blocks.0.resnets.1.time_emb_proj.
    Raises if keymap.py's diffusers rules do not map it back to `ours` (the two tables disagree: a bug)."""
    theirs = rename(ours + ".weight", unet_module_rules(n_levels))
    back = rename(theirs, diffusers_unet_rules(n_levels))
    if back != ours + ".weight":
        raise AssertionError(f"lora_keys.unet_module_rules and keymap.diffusers_unet_rules disagree on {ours!r}: "
                             f"→ {theirs!r} → {back!r}")
    return theirs.removesuffix(".weight")


def transformers_text_module(ours: str) -> str:
    """transformers' path of one of our CLIP modules,
    e.g. blocks.0.attn.q → text_model.encoder.layers.0.self_attn.q_proj."""
    official = CLIP_RULES.to_official(ours + ".weight")
    if official is None:
        raise AssertionError(f"keymap.CLIP_RULES has no official name for {ours!r}")
    return official.removesuffix(".weight")


@dataclass(frozen=True)
class Target:
    """One layer a LoRA may update: the network ("unet" / "text_encoder"), our module name, and the module."""
    network: str
    name: str
    module: nn.Module


def lora_targets(networks: dict[str, nn.Module]) -> dict[str, Target]:
    """{every accepted name of a layer → Target} for each Linear and Conv2d of the networks: the diffusers path
    with its network prefix (`unet.down_blocks.0…to_q`) and kohya's spelling (`lora_unet_down_blocks_0_…_to_q`)."""
    table: dict[str, Target] = {}
    for network, model in networks.items():
        n_levels = len(model.config.channel_mult) if network == "unet" else 0
        for ours, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            path = diffusers_unet_module(ours, n_levels) if network == "unet" else transformers_text_module(ours)
            target = Target(network, ours, module)
            table[f"{network}.{path}"] = target
            table[KOHYA_PREFIXES[network] + path.replace(".", "_")] = target
            if network == "text_encoder":   # transformers ≥ 5.6 has no inner text_model: tools saving it drop it
                table[f"{network}.{path.removeprefix('text_model.')}"] = target
    return table


def kohya_name(network: str, ours: str, n_levels: int = 4) -> str:
    """kohya's name for one of our modules (what a LoRA trainer writes),
    e.g. blocks.0.mlp.fc1 → lora_te_text_model_encoder_layers_0_mlp_fc1."""
    path = diffusers_unet_module(ours, n_levels) if network == "unet" else transformers_text_module(ours)
    return KOHYA_PREFIXES[network] + path.replace(".", "_")


# ---------------------------------------------------------------------------------------------------------------
# File keys → (layer name, role). The role is "down" (A, [r, in(, k, k)]), "up" (B, [out, r(, 1, 1)]) or "alpha".
# One rule per spelling; the first that matches wins. Group 1 is the layer name as `lora_targets` spells it.
# ---------------------------------------------------------------------------------------------------------------

ROLES = {"lora_down": "down", "lora_up": "up", "lora_A": "down", "lora_B": "up", "down": "down", "up": "up"}
OLD_UNET_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
OLD_TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

KEY_RULES: list[tuple[str, "callable"]] = [
    # kohya / A1111: lora_unet_<path with _>.lora_down.weight | .lora_up.weight | .alpha
    (r"^(lora_(?:unet|te)_[^.]+)\.(lora_down|lora_up)\.weight$", lambda m: (m[1], ROLES[m[2]])),
    (r"^(lora_(?:unet|te)_[^.]+)\.alpha$", lambda m: (m[1], "alpha")),
    # LyCORIS LoHa / LoKr, kohya names: lora_unet_<path>.hada_w1_a, .lokr_w1, .lokr_w2_b, …
    (r"^(lora_(?:unet|te)_[^.]+)\.(hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)$", lambda m: (m[1], m[2])),
    # diffusers ≥ 0.22 (PEFT): unet.<path>.lora_A.weight | .lora_B.weight (alpha, when stored, as <path>.alpha)
    (r"^((?:unet|text_encoder)\..+)\.(lora_A|lora_B)\.weight$", lambda m: (m[1], ROLES[m[2]])),
    # diffusers' attention-processor files (unet.save_attn_procs, 0.14–0.21): …attn1.processor.to_q_lora.down.weight
    (r"^(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$",
     lambda m: (f"unet.{m[1]}.{OLD_UNET_PROJECTIONS[m[2]]}", m[3])),
    # diffusers 0.17–0.21 text encoder: text_encoder.…self_attn.to_q_lora.down.weight
    (r"^(text_encoder\..+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$",
     lambda m: (f"{m[1]}.{OLD_TEXT_PROJECTIONS[m[2]]}", m[3])),
    # diffusers 0.21: unet.<path>.lora.down.weight, text_encoder.<path>.lora_linear_layer.up.weight
    (r"^((?:unet|text_encoder)\..+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$", lambda m: (m[1], m[2])),
    (r"^((?:unet|text_encoder)\..+)\.alpha$", lambda m: (m[1], "alpha")),
]

# Files of other kinds we can name, so the error says what the file is instead of listing every key.
OTHER_KINDS = [
    (r"^lora_te[12]_", "an SDXL LoRA (two text encoders, lora_te1_/lora_te2_); ldm_scratch loads SD v1 only"),
    (r"\.(lora_mid\.weight|hada_t[12]|lokr_t2)$", "a LyCORIS file with Tucker decomposition (lora_mid, hada_t, "
                                                 "lokr_t2); LoRA/LoCon, LoHa and LoKr without it are supported"),
    (r"\.dora_scale$", "a DoRA file (dora_scale); LoRA/LoCon, LoHa and LoKr are supported"),
    (r"^(emb_params|string_to_param\..*)$", "a textual-inversion embedding, not a LoRA: use load_textual_inversion"),
]


def parse_key(key: str) -> tuple[str, str] | None:
    """(layer name, role) for one file key, or None when no spelling of ours matches it."""
    for pattern, read in KEY_RULES:
        match = re.match(pattern, key)
        if match:
            return read(match)
    return None


def other_kind(keys) -> str | None:
    """What a file that is not a plain LoRA is, when its keys say so (None: unknown)."""
    for pattern, what in OTHER_KINDS:
        if any(re.search(pattern, key) for key in keys):
            return what
    return None
