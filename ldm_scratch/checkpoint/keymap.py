"""The key map: official tensor names ↔ our module names, and a network's config read off its tensor shapes.

An official Stable Diffusion v1 single file is one flat {name: tensor} dictionary holding three networks side by
side, told apart by a prefix:

    model.diffusion_model.*           → UNet          (ldm_scratch/unet.py)
    first_stage_model.*               → KL-VAE        (ldm_scratch/vae.py)
    cond_stage_model.transformer.*    → CLIP text     (ldm_scratch/clip.py)

Our modules use names of their own (they explain themselves to a reader). The official layout is translated by a
`KeyMap`, which works both ways (we read that layout and write it): a list of blocks, each an (official prefix,
our prefix, parts) triple, where `parts` renames what lies inside that kind of block:

    official  model.diffusion_model.input_blocks.4.0.in_layers.0.weight
              └────── prefix ──────┘└──── block ────┘└── part ──┘
    ours                            down.1.res.0.    norm1.      weight

`{}` in a block prefix is an index that carries over unchanged (CLIP's layer i is our blocks.i). The UNet's block
numbers do not carry over: CompVis numbers its blocks in running order, so which number is which block depends on
the topology (levels, ResBlocks per level, which levels attend). `unet_keymap(layout)` lists every block of one
topology, numbered as CompVis' UNetModel appends them; the layout comes from the config when writing and from the
file's own keys when reading (`UNetLayout.of_keys`: where the downsample `op`s sit).

The diffusers folder layout is only read, so its tables are plain (regex, replacement) rules, applied in order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from ..clip import CLIPTextConfig
from ..unet import UNetConfig
from ..vae import VAEConfig
from .tensor_file import CheckpointError
from .upscaler_keys import self_attention_switches

Rule = tuple[str, "str | Callable[[re.Match], str]"]
Parts = tuple[tuple[str, str], ...]   # (official, ours) name fragments inside one kind of block


@dataclass(frozen=True)
class KeyMap:
    """Two-way names for one network: `blocks` are (official prefix, our prefix, parts); the first block whose
    prefix matches a key renames it. `aliases` are other spellings some files use, rewritten to the official one
    before reading."""
    blocks: tuple[tuple[str, str, Parts], ...]
    aliases: tuple[Rule, ...] = ()

    def to_ours(self, key: str) -> str:
        """Our name for an official key; a key of no block keeps its name (and the strict loader rejects it)."""
        for pattern, replacement in self.aliases:
            key = re.sub(pattern, replacement, key)
        return self._translate(key, to_ours=True) or key

    def to_official(self, name: str) -> str | None:
        """The official key for one of our names; None if the official layout has no place for it."""
        return self._translate(name, to_ours=False)

    def _translate(self, key: str, to_ours: bool) -> str | None:
        for official, ours, parts in self.blocks:
            source, target = (official, ours) if to_ours else (ours, official)
            match = re.match(re.escape(source).replace(r"\{\}", r"(\d+)"), key)
            if match:
                rest = key[match.end():]
                for part_official, part_ours in parts:
                    a, b = (part_official, part_ours) if to_ours else (part_ours, part_official)
                    rest = re.sub(r"(?<![^.])" + re.escape(a), b, rest)   # whole dotted segments only
                return target.format(*match.groups()) + rest
        return None


def rename(key: str, rules: "KeyMap | Iterable[Rule]") -> str:
    """Our name for one file key (the part after the component prefix): a KeyMap's, or every rule of a table, in
    order."""
    if isinstance(rules, KeyMap):
        return rules.to_ours(key)
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


# ---------------------------------------------------------------------------------------------------------------
# CLIP text encoder (official: transformers' CLIPTextModel state dict under cond_stage_model.transformer.)
# e.g. text_model.encoder.layers.3.self_attn.q_proj.weight ↔ blocks.3.attn.q.weight
# ---------------------------------------------------------------------------------------------------------------

CLIP_LAYER: Parts = (("self_attn.q_proj.", "attn.q."), ("self_attn.k_proj.", "attn.k."),
                     ("self_attn.v_proj.", "attn.v."), ("self_attn.out_proj.", "attn.out."),
                     ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."))   # mlp.fc1 / mlp.fc2 keep their names
CLIP_RULES = KeyMap(
    blocks=(("text_model.embeddings.token_embedding.", "token_embedding.", ()),
            ("text_model.embeddings.position_embedding.", "position_embedding.", ()),
            ("text_model.encoder.layers.{}.", "blocks.{}.", CLIP_LAYER),
            ("text_model.final_layer_norm.", "final_norm.", ())),
    # transformers < 5.6 wrapped the tower in .text_model; later versions and some tools write the flat names
    aliases=((r"^(?!text_model\.)", "text_model."),))

# ---------------------------------------------------------------------------------------------------------------
# UNet (official: CompVis openaimodel.UNetModel under model.diffusion_model.)
# e.g. input_blocks.4.0.in_layers.2.weight ↔ down.1.res.0.conv1.weight (SD v1),
#      output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight ↔ up.2.attn.2.blocks.0.cross_attn.to_k.weight.
# ---------------------------------------------------------------------------------------------------------------

RES_BLOCK: Parts = (  # ResBlock: in_layers = GroupNorm, SiLU, conv; out_layers = GroupNorm, SiLU, Dropout, conv
    ("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_proj."),
    ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "skip."))
SPATIAL_TRANSFORMER: Parts = (  # norm, proj_in, proj_out and each block's norm1…3 keep their names
    ("transformer_blocks.", "blocks."), ("attn1.", "self_attn."), ("attn2.", "cross_attn."),
    ("to_out.0.", "to_out."),                                          # to_out = Sequential(Linear, Dropout)
    ("ff.net.0.proj.", "ff.geglu."), ("ff.net.2.", "ff.out."))


@dataclass(frozen=True)
class UNetLayout:
    """What decides CompVis' block numbers: the number of levels, ResBlocks per (down) level, attending levels."""
    n_levels: int = 4
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    class_label: bool = False            # ×4 upscaler: label_emb, the noise level's embedding (not numbered)

    @classmethod
    def of(cls, config: UNetConfig) -> "UNetLayout":
        return cls(len(config.channel_mult), config.num_res_blocks, tuple(config.attention_levels),
                   config.num_classes is not None)

    @classmethod
    def of_keys(cls, keys: Iterable[str]) -> "UNetLayout":
        """The layout of an official UNet from its key names (prefix removed). Level l's ResBlocks are
        input_blocks 1 + l·(R + 1) + j, j < R, each followed by its attention (.1) if the level attends, and
        every level but the last ends with a downsample `op`: the first op sits at R + 1."""
        keys = list(keys)
        inputs = {int(m[1]) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
        ops = sorted(int(m[1]) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
        if not inputs:
            return cls()  # not a UNet at all: SD v1's numbering, and the accounting will say what is wrong
        per_level = ops[0] if ops else max(inputs) + 1                  # R ResBlocks and the downsample
        attends = {(n - 1) // per_level for k in keys
                   if (m := re.match(r"input_blocks\.(\d+)\.1\.", k)) and (n := int(m[1])) % per_level}
        return cls(len(ops) + 1, per_level - 1, tuple(sorted(attends)), "label_emb.weight" in keys)


def unet_keymap(layout: UNetLayout = UNetLayout()) -> KeyMap:
    """The official names of a UNet of this layout, numbered as UNetModel.__init__ appends its blocks:
    input_blocks (the input conv; then per level R × [ResBlock, SpatialTransformer?], and a downsample after
    every level but the last), middle_block, output_blocks (levels deepest first, R + 1 × [ResBlock,
    SpatialTransformer?], an upsample inside the last block of every level but level 0). Our up.l mirrors down.l."""
    R, attends = layout.num_res_blocks, lambda level: level in layout.attention_levels
    blocks = [("time_embed.0.", "time_embedding.linear1.", ()), ("time_embed.2.", "time_embedding.linear2.", ()),
              ("input_blocks.0.0.", "input_conv.", ())] + [("label_emb.", "class_embedding.", ())] * layout.class_label
    n = 1
    for level in range(layout.n_levels):
        for j in range(R):
            blocks.append((f"input_blocks.{n}.0.", f"down.{level}.res.{j}.", RES_BLOCK))
            if attends(level):
                blocks.append((f"input_blocks.{n}.1.", f"down.{level}.attn.{j}.", SPATIAL_TRANSFORMER))
            n += 1
        if level < layout.n_levels - 1:
            blocks.append((f"input_blocks.{n}.0.op.", f"down.{level}.downsample.", ()))
            n += 1
    blocks += [("middle_block.0.", "middle.res1.", RES_BLOCK), ("middle_block.1.", "middle.attn.", SPATIAL_TRANSFORMER),
               ("middle_block.2.", "middle.res2.", RES_BLOCK)]
    n = 0
    for level in reversed(range(layout.n_levels)):
        for j in range(R + 1):
            blocks.append((f"output_blocks.{n}.0.", f"up.{level}.res.{j}.", RES_BLOCK))
            if attends(level):
                blocks.append((f"output_blocks.{n}.1.", f"up.{level}.attn.{j}.", SPATIAL_TRANSFORMER))
            if j == R and level > 0:
                blocks.append((f"output_blocks.{n}.{1 + attends(level)}.conv.", f"up.{level}.upsample.conv.", ()))
            n += 1
    blocks += [("out.0.", "output_norm.", ()), ("out.2.", "output_conv.", ())]
    return KeyMap(tuple(blocks))


UNET_RULES = unet_keymap()  # SD v1: 4 levels of 2 ResBlocks, attention at levels 0, 1, 2

# ---------------------------------------------------------------------------------------------------------------
# VAE (official: CompVis AutoencoderKL under first_stage_model.)
# e.g. encoder.down.1.block.0.nin_shortcut.weight ↔ encoder.levels.1.res_blocks.0.skip.weight,
#      decoder.mid.attn_1.proj_out.weight [512, 512, 1, 1] ↔ decoder.mid.attention.to_out.weight [512, 512].
# Level i is resolution H/2^i on both sides, as in the official names (decoder.up.i), so indices carry over.
# ---------------------------------------------------------------------------------------------------------------

VAE_RES_BLOCK: Parts = (("nin_shortcut.", "skip."),)
VAE_ATTENTION: Parts = (("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out."))  # and its norm
VAE_RULES = KeyMap(tuple(
    [("encoder.down.{}.block.{}.", "encoder.levels.{}.res_blocks.{}.", VAE_RES_BLOCK),
     ("encoder.down.{}.downsample.", "encoder.levels.{}.downsample.", ()),
     ("decoder.up.{}.block.{}.", "decoder.levels.{}.res_blocks.{}.", VAE_RES_BLOCK),
     ("decoder.up.{}.upsample.", "decoder.levels.{}.upsample.", ())]
    + [block for side in ("encoder", "decoder") for block in (
        (f"{side}.conv_in.", f"{side}.conv_in.", ()),   # these three keep their names
        (f"{side}.norm_out.", f"{side}.norm_out.", ()),
        (f"{side}.conv_out.", f"{side}.conv_out.", ()),
        (f"{side}.mid.block_1.", f"{side}.mid.res1.", VAE_RES_BLOCK),
        (f"{side}.mid.block_2.", f"{side}.mid.res2.", VAE_RES_BLOCK),
        (f"{side}.mid.attn_1.", f"{side}.mid.attention.", VAE_ATTENTION))]
    + [("quant_conv.", "posterior_conv.", ()),    # a VQ-GAN name; nothing is quantised in the KL autoencoder
       ("post_quant_conv.", "latent_conv.", ())]))

# ---------------------------------------------------------------------------------------------------------------
# The single file: each network under its prefix, and what else an official file may hold.
# ---------------------------------------------------------------------------------------------------------------

SINGLE_FILE_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                        "text_encoder": "cond_stage_model.transformer."}


def single_file_keymaps(unet_layout: UNetLayout) -> dict[str, KeyMap]:
    """{network: its KeyMap} for a single file whose UNet has this layout."""
    return {"unet": unet_keymap(unet_layout), "vae": VAE_RULES, "text_encoder": CLIP_RULES}


def map_single_file(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """{network: {our name → file key}} for an official single file, its UNet numbered by the layout its own keys
    show."""
    keys = list(keys)
    unet_prefix = SINGLE_FILE_PREFIXES["unet"]
    layout = UNetLayout.of_keys(k[len(unet_prefix):] for k in keys if k.startswith(unet_prefix))
    return {network: map_component(keys, SINGLE_FILE_PREFIXES[network], keymap)
            for network, keymap in single_file_keymaps(layout).items()}


# Tensors an official file may carry that no module of ours needs, each with the reason.
DDPM_SCHEDULE_BUFFERS = (  # recomputed from the β schedule in diffusion.py; many community files lack them
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
IGNORED_KEYS = {
    **{name: "DDPM schedule buffer, recomputed from the β schedule" for name in DDPM_SCHEDULE_BUFFERS},
    # always arange(77); stored as int64 by old transformers, as float by some merging tools, absent in others
    "cond_stage_model.transformer.text_model.embeddings.position_ids": "CLIP position ids, always arange(77)",
    "cond_stage_model.transformer.embeddings.position_ids": "CLIP position ids, always arange(77)",
    "text_model.embeddings.position_ids": "CLIP position ids in a diffusers text_encoder/ file",
    "embeddings.position_ids": "CLIP position ids in a (flattened) diffusers text_encoder/ file",
    "model_ema.decay": "EMA bookkeeping scalar",
    "model_ema.num_updates": "EMA bookkeeping scalar",
}
EMA_PREFIX = "model_ema."


def ema_key(unet_key: str) -> str:
    """Name of the EMA copy of a UNet weight: LitEma strips the dots, e.g.
    'model.diffusion_model.input_blocks.0.0.weight' → 'model_ema.diffusion_modelinput_blocks00weight'."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def map_component(keys: Iterable[str], prefix: str, rules: "KeyMap | Iterable[Rule]") -> dict[str, str]:
    """{our name → file key} for every file key that starts with `prefix`. Two file keys landing on one
    name is an error (a tensor must be used exactly once)."""
    mapping: dict[str, str] = {}
    for key in keys:
        if not key.startswith(prefix) or key in IGNORED_KEYS:
            continue
        ours = rename(key[len(prefix):], rules)
        if ours in mapping:
            raise CheckpointError(f"both '{mapping[ours]}' and '{key}' map to '{ours}'")
        mapping[ours] = key
    return mapping


# ---------------------------------------------------------------------------------------------------------------
# The same networks in the diffusers folder layout (unet/, vae/, text_encoder/): read only, plain rules.
# ---------------------------------------------------------------------------------------------------------------

DIFFUSERS_CLIP_RULES = CLIP_RULES  # text_encoder/model.safetensors is the same transformers state dict


def diffusers_unet_rules(n_levels: int = 4) -> list[Rule]:
    """diffusers' UNet2DConditionModel: e.g. up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight →
    up.2.attn.2.blocks.0.cross_attn.to_k.weight (SD v1). Its up_blocks run deepest first: up_blocks.k is our
    up.(n_levels − 1 − k)."""
    up = lambda m: n_levels - 1 - int(m[1])
    return [
        (r"^conv_in\.", "input_conv."),
        (r"^time_embedding\.linear_([12])\.", r"time_embedding.linear\1."),
        (r"^time_embedding\.cond_proj\.", "time_embedding.guidance_proj."),   # full LCM UNet: w's Linear [320, 256]
        (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.res."),
        (r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"down.\1.downsample."),
        (r"^mid_block\.resnets\.([01])\.", lambda m: f"middle.res{int(m[1]) + 1}."),
        (r"^mid_block\.attentions\.0\.", "middle.attn."),
        (r"^up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{up(m)}.res."),
        (r"^up_blocks\.(\d+)\.attentions\.", lambda m: f"up.{up(m)}.attn."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{up(m)}.upsample."),
        (r"^conv_norm_out\.", "output_norm."),
        (r"^conv_out\.", "output_conv."),
        (r"\.time_emb_proj\.", ".time_proj."),          # ResBlock: norm1, conv1, norm2, conv2 keep their names
        (r"\.conv_shortcut\.", ".skip."),
        (r"\.transformer_blocks\.", ".blocks."),
        (r"\.attn1\.", ".self_attn."),
        (r"\.attn2\.", ".cross_attn."),
        (r"\.to_out\.0\.", ".to_out."),
        (r"\.ff\.net\.0\.proj\.", ".ff.geglu."),
        (r"\.ff\.net\.2\.", ".ff.out."),
    ]


def diffusers_vae_rules(n_levels: int = 4) -> list[Rule]:
    """diffusers' AutoencoderKL (vae/diffusion_pytorch_model.safetensors). Its decoder numbers up_blocks in the
    order they run (0 = coarsest), the reverse of our levels: up_blocks.i → levels.(n_levels − 1 − i).
    Attention projections are Linear there ([C, C]); folders saved by diffusers < 0.14 call them query/key/value/
    proj_attn."""
    return [
        (r"^encoder\.down_blocks\.(\d+)\.", r"encoder.levels.\1."),
        (r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.levels.{n_levels - 1 - int(m[1])}."),
        (r"\.mid_block\.resnets\.0\.", ".mid.res1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.res2."),
        (r"\.mid_block\.attentions\.0\.", ".mid.attention."),
        (r"\.resnets\.(\d+)\.", r".res_blocks.\1."),
        (r"\.downsamplers\.0\.", ".downsample."),
        (r"\.upsamplers\.0\.", ".upsample."),
        (r"\.conv_shortcut\.", ".skip."),
        (r"\.attention\.group_norm\.", ".attention.norm."),
        (r"\.attention\.(to_out\.0|proj_attn)\.", ".attention.to_out."),
        (r"\.attention\.query\.", ".attention.to_q."),
        (r"\.attention\.key\.", ".attention.to_k."),
        (r"\.attention\.value\.", ".attention.to_v."),
        (r"\.conv_norm_out\.", ".norm_out."),
        (r"^quant_conv\.", "posterior_conv."),
        (r"^post_quant_conv\.", "latent_conv."),
    ]


def diffusers_levels(keys: Iterable[str]) -> int:
    """How many levels a diffusers UNet or VAE has: its down_blocks."""
    return 1 + max((int(m[1]) for k in keys if (m := re.search(r"(?:^|\.)down_blocks\.(\d+)\.", k))), default=3)


DIFFUSERS_UNET_RULES = diffusers_unet_rules()  # SD v1's four levels
DIFFUSERS_VAE_RULES = diffusers_vae_rules()

# ---------------------------------------------------------------------------------------------------------------
# Config from shapes: official files carry no config, but every size but the head counts and GroupNorm groups is
# visible in the tensor shapes. Shapes are keyed by OUR names (after the tables above).
# ---------------------------------------------------------------------------------------------------------------

def clip_config_from_shapes(shapes: dict[str, tuple], head_dim: int = 64,
                            activation: str = "quick_gelu") -> CLIPTextConfig:
    """The text encoder's config. The number of heads leaves no trace in the weight shapes (q/k/v are [C, C]
    whatever the split), so it is taken as width / head_dim: every CLIP text tower (OpenAI and OpenCLIP) uses
    64-channel heads. The activation cannot be seen either: quick-GELU (SD v1) unless told (OpenCLIP: "gelu")."""
    fc1 = sorted(name for name in shapes if name.startswith("blocks.") and name.endswith(".mlp.fc1.weight"))
    missing = [name for name in ("token_embedding.weight", "position_embedding.weight") if name not in shapes]
    if missing or not fc1:
        raise CheckpointError("cannot infer the text encoder's size: no tensor "
                              + ", ".join(missing + ([] if fc1 else ["blocks.*.mlp.fc1.weight"]))
                              + " (our names, after CLIP_RULES). Is this an SD v1 checkpoint?")
    vocab_size, width = shapes["token_embedding.weight"]
    n_layers = 1 + max(int(name.split(".")[1]) for name in shapes if name.startswith("blocks."))
    if width % head_dim:
        raise CheckpointError(f"text encoder width {width} is not a multiple of the {head_dim}-channel CLIP head")
    return CLIPTextConfig(vocab_size=vocab_size, width=width, n_layers=n_layers, n_heads=width // head_dim,
                          mlp_width=shapes[fc1[0]][0], max_positions=shapes["position_embedding.weight"][0],
                          activation=activation)


def unet_config_from_shapes(shapes: dict[str, tuple], n_heads: int = 8, norm_groups: int = 32,
                            head_dim: int | None = None, upcast_attention: bool = False) -> UNetConfig:
    """The UNet's config. SD v1 uses 8 heads and 32 groups; SD 2.x fixes d_head = 64 instead (head_dim=64: the
    loader passes it for a 1024-wide context). Linear proj_in/proj_out ([C, C], SD 2) vs 1×1 convs ([C, C, 1, 1],
    SD v1) is read off the shape. 9 input channels ⇒ inpainting."""
    def indices(pattern: str) -> set[int]:
        return {int(m[1]) for key in shapes if (m := re.fullmatch(pattern, key))}

    model_channels, in_channels = shapes["input_conv.weight"][:2]    # [model_channels, in_channels, 3, 3]
    n_levels = len(indices(r"down\.(\d+)\.res\.0\.conv1\.weight"))
    attention_levels = tuple(sorted(indices(r"down\.(\d+)\.attn\.0\.norm\.weight")))
    first_attn = f"down.{attention_levels[0]}.attn.0" if attention_levels else "middle.attn"
    context_dim = shapes[f"{first_attn}.blocks.0.cross_attn.to_k.weight"][1]
    return UNetConfig(
        in_channels=in_channels,
        out_channels=shapes["output_conv.weight"][0],
        model_channels=model_channels,
        channel_mult=tuple(shapes[f"down.{i}.res.0.conv1.weight"][0] // model_channels for i in range(n_levels)),
        num_res_blocks=len(indices(r"down\.0\.res\.(\d+)\.conv1\.weight")),
        attention_levels=attention_levels,
        n_heads=n_heads,
        transformer_depth=len(indices(re.escape(first_attn) + r"\.blocks\.(\d+)\.norm1\.weight")),
        context_dim=context_dim, **self_attention_switches(shapes, context_dim),     # ×4 upscaler (upscaler_keys.py)
        norm_groups=norm_groups, head_dim=head_dim, upcast_attention=upcast_attention,
        linear_projection=len(shapes[f"{first_attn}.proj_in.weight"]) == 2,      # SD 2: Linear [C, C]
        guidance_embed_dim=shapes.get("time_embedding.guidance_proj.weight", (None, None))[1])   # full LCM UNet


def vae_config_from_shapes(shapes: dict[str, tuple], norm_groups: int = 32) -> VAEConfig:
    """The autoencoder's config. GroupNorm's group count and ε leave no trace in the shapes: SD v1's 32 groups
    unless told otherwise, ε = 1e-6."""
    base, in_channels = shapes["encoder.conv_in.weight"][:2]
    n_levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.levels."))
    n_res = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.levels.0.res_blocks."))
    widths = [shapes[f"encoder.levels.{i}.res_blocks.0.conv1.weight"][0] for i in range(n_levels)]
    return VAEConfig(in_channels=in_channels, out_channels=shapes["decoder.conv_out.weight"][0], base_channels=base,
                     channel_mult=tuple(w // base for w in widths), num_res_blocks=n_res,
                     z_channels=shapes["latent_conv.weight"][0], norm_groups=norm_groups)
