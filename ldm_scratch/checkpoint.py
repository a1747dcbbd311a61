"""Reading checkpoint files and mapping the official tensor names onto our modules.

An official Stable Diffusion v1 single file is one flat {name: tensor} dictionary holding three networks side by
side, told apart by a prefix:

    model.diffusion_model.*           → UNet          (ldm_scratch/unet.py)
    first_stage_model.*               → KL-VAE        (ldm_scratch/vae.py)
    cond_stage_model.transformer.*    → CLIP text     (ldm_scratch/clip.py)

Our modules use names of their own (they explain themselves to a reader); the translation is the rule tables
below: ordered (regex, replacement) pairs applied one after the other to the part of the key after its prefix.
Loading is strict: every parameter of our module must be filled exactly once, every tensor in the file must be
used or be on the short allow-list `IGNORED_KEYS`, and shapes must agree. Anything else raises `CheckpointError`
listing the offending keys, and nothing is half-loaded.

Memory: modules are built on the `meta` device (no storage) and the file's tensors are assigned into them
(`load_state_dict(assign=True)`), so the weights exist once in memory, not twice.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

Rule = tuple[str, "str | Callable[[re.Match], str]"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the problem and what to do about it."""


# ---------------------------------------------------------------------------------------------------------------
# The rule tables: official (CompVis / LDM) names → our module names.
# Each network's table is filled in beside its module; the loader below is the same for all of them.
# ---------------------------------------------------------------------------------------------------------------

# --- CLIP text encoder (official: transformers' CLIPTextModel state dict under cond_stage_model.transformer.) ---
# e.g. text_model.encoder.layers.3.self_attn.q_proj.weight → blocks.3.attn.q.weight
CLIP_RULES: list[Rule] = [
    (r"^text_model\.", ""),                             # transformers < 5.6 wrapped the tower in .text_model; later
                                                        # versions and some tools write the flat names: accept both
    (r"^embeddings\.", ""),                             # embeddings.token_embedding / .position_embedding
    (r"^encoder\.layers\.(\d+)\.", r"blocks.\1."),
    (r"\.self_attn\.([qkv])_proj\.", r".attn.\1."),
    (r"\.self_attn\.out_proj\.", r".attn.out."),
    (r"\.layer_norm([12])\.", r".norm\1."),             # mlp.fc1 / mlp.fc2 keep their names
    (r"^final_layer_norm\.", "final_norm."),
]

# --- UNet (official: CompVis openaimodel.UNetModel under model.diffusion_model.) ---
# e.g. input_blocks.4.0.in_layers.2.weight → down.1.res.0.conv1.weight,
#      output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight → up.2.attn.2.blocks.0.cross_attn.to_k.weight.
# The official blocks are numbered in running order, which assumes SD v1's topology: 4 levels of 2 ResBlocks;
# input_blocks 1 + 3·level + j (j = 0, 1: res [+ attn]; j = 2: the downsample), output_blocks 3·(3 − level) + j.
# Our up.i mirrors down.i (same resolution), so the decoder's level is 3 − (its running index).
def _official_block(m: re.Match) -> str:   # input_blocks.N.K. / output_blocks.N.K. → down|up.level.res|attn.j.
    n, kind = int(m[2]), ("res", "attn")[int(m[3])]
    if m[1] == "input":
        level, j = divmod(n - 1, 3)
        return f"down.{level}.{kind}.{j}."
    return f"up.{3 - n // 3}.{kind}.{n % 3}."


UNET_RULES: list[Rule] = [
    (r"^time_embed\.0\.", "time_embedding.linear1."),
    (r"^time_embed\.2\.", "time_embedding.linear2."),
    (r"^input_blocks\.0\.0\.", "input_conv."),
    (r"^input_blocks\.(\d+)\.0\.op\.", lambda m: f"down.{(int(m[1]) - 1) // 3}.downsample."),  # N = 3, 6, 9
    # upsamples: output_blocks 2.1, 5.2, 8.2 (at level 3, which has no attention, the upsample is K = 1)
    (r"^output_blocks\.(\d+)\.[12]\.conv\.", lambda m: f"up.{3 - int(m[1]) // 3}.upsample.conv."),
    (r"^(input|output)_blocks\.(\d+)\.([01])\.", _official_block),
    (r"^middle_block\.0\.", "middle.res1."),
    (r"^middle_block\.1\.", "middle.attn."),
    (r"^middle_block\.2\.", "middle.res2."),
    (r"^out\.0\.", "output_norm."),
    (r"^out\.2\.", "output_conv."),
    # inside a ResBlock (Sequentials: in_layers = GroupNorm, SiLU, conv; out_layers = GroupNorm, SiLU, Dropout, conv)
    (r"\.in_layers\.0\.", ".norm1."),
    (r"\.in_layers\.2\.", ".conv1."),
    (r"\.emb_layers\.1\.", ".time_proj."),
    (r"\.out_layers\.0\.", ".norm2."),
    (r"\.out_layers\.3\.", ".conv2."),
    (r"\.skip_connection\.", ".skip."),
    # inside a SpatialTransformer
    (r"\.transformer_blocks\.", ".blocks."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".to_out."),                                    # to_out = Sequential(Linear, Dropout)
    (r"\.ff\.net\.0\.proj\.", ".ff.geglu."),
    (r"\.ff\.net\.2\.", ".ff.out."),
]

# --- VAE (official: CompVis AutoencoderKL under first_stage_model.) ---
# e.g. encoder.down.1.block.0.nin_shortcut.weight → encoder.levels.1.res_blocks.0.skip.weight,
#      decoder.mid.attn_1.proj_out.weight [512, 512, 1, 1] → decoder.mid.attention.to_out.weight [512, 512].
# Level i is resolution H/2^i on both sides, as in the official names (decoder.up.i), so indices carry over.
VAE_RULES: list[Rule] = [
    (r"^encoder\.down\.(\d+)\.", r"encoder.levels.\1."),
    (r"^decoder\.up\.(\d+)\.", r"decoder.levels.\1."),
    (r"\.block\.(\d+)\.", r".res_blocks.\1."),
    (r"\.nin_shortcut\.", ".skip."),
    (r"\.mid\.block_1\.", ".mid.res1."),
    (r"\.mid\.block_2\.", ".mid.res2."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid.attention.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid.attention.to_out."),
    (r"\.mid\.attn_1\.", ".mid.attention."),  # its GroupNorm, `norm`
    (r"^quant_conv\.", "posterior_conv."),      # a VQ-GAN name; nothing is quantised in the KL autoencoder
    (r"^post_quant_conv\.", "latent_conv."),
]

# --- The same networks in the diffusers folder layout (unet/, vae/, text_encoder/) ---
DIFFUSERS_CLIP_RULES: list[Rule] = CLIP_RULES  # text_encoder/model.safetensors is the same transformers state dict
# diffusers' UNet2DConditionModel: e.g. up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight →
# up.2.attn.2.blocks.0.cross_attn.to_k.weight. Its up_blocks run deepest first, so up_blocks.k is our up.(3 − k).
DIFFUSERS_UNET_RULES: list[Rule] = [
    (r"^conv_in\.", "input_conv."),
    (r"^time_embedding\.linear_([12])\.", r"time_embedding.linear\1."),
    (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.res."),
    (r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"down.\1.downsample."),
    (r"^mid_block\.resnets\.([01])\.", lambda m: f"middle.res{int(m[1]) + 1}."),
    (r"^mid_block\.attentions\.0\.", "middle.attn."),
    (r"^up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{3 - int(m[1])}.res."),
    (r"^up_blocks\.(\d+)\.attentions\.", lambda m: f"up.{3 - int(m[1])}.attn."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{3 - int(m[1])}.upsample."),
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
# diffusers' AutoencoderKL (vae/diffusion_pytorch_model.safetensors). Its decoder numbers up_blocks in the order
# they run (0 = coarsest), the reverse of our levels: up_blocks.i → levels.{3 − i} for SD v1's four levels.
# Attention projections are Linear there ([C, C]); folders saved by diffusers < 0.14 call them query/key/value/
# proj_attn.
DIFFUSERS_VAE_RULES: list[Rule] = [
    (r"^encoder\.down_blocks\.(\d+)\.", r"encoder.levels.\1."),
    (r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.levels.{3 - int(m[1])}."),
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


@dataclass(frozen=True)
class Component:
    """One network inside a single-file checkpoint: the prefix its keys carry and the rules that rename them."""
    name: str
    prefix: str
    rules: list[Rule]


SINGLE_FILE_COMPONENTS = (
    Component("unet", "model.diffusion_model.", UNET_RULES),
    Component("vae", "first_stage_model.", VAE_RULES),
    Component("text_encoder", "cond_stage_model.transformer.", CLIP_RULES),
)

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


def rename(key: str, rules: Iterable[Rule]) -> str:
    """Apply every rule of a table, in order, to one key (the part after the component prefix)."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def ema_key(unet_key: str) -> str:
    """Name of the EMA copy of a UNet weight: LitEma strips the dots, e.g.
    'model.diffusion_model.input_blocks.0.0.weight' → 'model_ema.diffusion_modelinput_blocks00weight'."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}

# ---------------------------------------------------------------------------------------------------------------
# Tensor sources: a read-only {key → tensor} view of a file that loads one tensor at a time.
# ---------------------------------------------------------------------------------------------------------------

class TensorFile:
    """Lazy view of the tensors of one file: shapes are known without reading data; `get` reads one tensor.

    `.safetensors` is parsed here: the header, then one tensor at a time with plain reads (no pickle, no memory map).
    `.ckpt`/`.pt`/`.bin` are torch pickles and are only opened with `torch.load(weights_only=True)`, which refuses
    arbitrary Python objects.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file. Check the path, or see weights/README.md for where "
                                  "to put the official weights.")
        self.metadata: dict[str, str] = {}
        if self.path.suffix == ".safetensors":
            self._open_safetensors()
        elif self.path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            self._open_pickle()
        else:
            raise CheckpointError(f"{self.path}: unknown file type '{self.path.suffix}'. Expected a .safetensors file "
                                  "(preferred), a .ckpt, or a diffusers folder with unet/, vae/, text_encoder/.")

    def _open_safetensors(self) -> None:
        """Read the safetensors header: 8 bytes little-endian length N, N bytes of JSON {name: {dtype, shape,
        data_offsets}}, then the raw tensor bytes. Tensors are later read one at a time with plain file reads
        (no memory map), so loading never holds the file's pages and our copy of the weights at once."""
        size = self.path.stat().st_size
        problem = None
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, 100_000_000):
                problem = "its header length is not plausible"
            else:
                try:
                    header = json.loads(f.read(n))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    problem = "its header is not valid JSON"
        if problem is None:
            self.metadata = header.pop("__metadata__", None) or {}
            self._data_start = 8 + n
            try:
                self._entries = {k: (_SAFETENSORS_DTYPES[v["dtype"]], tuple(v["shape"]), *v["data_offsets"])
                                 for k, v in header.items()}
            except (KeyError, TypeError, ValueError):
                problem = "its header does not describe tensors"
        if problem is None:
            end = max((e[3] for e in self._entries.values()), default=0)
            if self._data_start + end > size:
                problem = (f"it is truncated: the header promises {self._data_start + end:,} bytes but the file has "
                           f"{size:,} (an interrupted download? compare its size and sha256 with the source)")
        if problem is not None:
            raise CheckpointError(f"{self.path} ({size:,} bytes) is not a readable safetensors file: {problem}. "
                                  "Re-download it, or check that it is not another format renamed to .safetensors.")
        self.shapes = {k: e[1] for k, e in self._entries.items()}
        self.dtypes = {k: str(e[0]).removeprefix("torch.") for k, e in self._entries.items()}
        self._get = self._read_safetensors_tensor

    def _read_safetensors_tensor(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        tensor = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))  # little-endian, as on every CPU we run
        return tensor

    def _open_pickle(self) -> None:
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise CheckpointError(
                f"{self.path}: torch.load(weights_only=True) refused this file ({type(error).__name__}: "
                f"{str(error)[:200]}). It may be truncated, or it pickles arbitrary Python objects, which we never "
                "unpickle. Convert it to .safetensors in an environment you trust, or download the .safetensors "
                "release.") from None
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]  # CompVis .ckpt: {'state_dict': {...}, 'global_step': ...}
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{self.path}: expected a dictionary of tensors (optionally under 'state_dict').")
        self._tensors = data
        self.shapes = {k: tuple(v.shape) for k, v in data.items()}
        self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in data.items()}
        self._get = self._tensors.__getitem__

    def keys(self) -> Iterator[str]:
        return iter(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str) -> torch.Tensor:
        return self._get(key)


# ---------------------------------------------------------------------------------------------------------------
# The strict loader.
# ---------------------------------------------------------------------------------------------------------------

def _list(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def map_component(keys: Iterable[str], prefix: str, rules: Iterable[Rule]) -> dict[str, str]:
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


def check_mapping(module: nn.Module, mapping: dict[str, str], shapes: dict[str, tuple], what: str) -> None:
    """Strict accounting without reading any data: every parameter/buffer of `module` gets exactly one tensor of the
    right shape, and no mapped tensor is left without a home. Raises CheckpointError naming every offender."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    missing = expected.keys() - mapping.keys()
    unexpected = [mapping[name] for name in mapping.keys() - expected.keys()]
    misshapen = [f"{mapping[n]} {list(shapes[mapping[n]])} (expected {list(expected[n])})"
                 for n in expected.keys() & mapping.keys() if not _same_numbers(shapes[mapping[n]], expected[n])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) for our {what} parameters: {_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_list(unexpected)}")
    if misshapen:
        problems.append(f"{len(misshapen)} tensor(s) with the wrong shape: {_list(misshapen, 6)}")
    if problems:
        raise CheckpointError(f"cannot load the {what}: " + "; ".join(problems)
                              + ". Is this an SD v1.x checkpoint? `ldm-scratch inspect FILE` shows what it holds.")


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """True when no element is NaN or ±inf. Checked a million elements at a time, so the temporary is 1 MiB of
    booleans: `torch.isfinite(tensor).all()` would make a boolean copy of the whole tensor (145 MiB for SD's token
    embedding), and a float64 sum a float64 copy (290 MiB); such transients add up to the load's peak memory."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


def fill_module(module: nn.Module, mapping: dict[str, str], get: Callable[[str], torch.Tensor],
                shapes: dict[str, tuple], what: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Fill every parameter and buffer of `module` (built on the meta device) from the file, strictly.

    mapping: {our state-dict name → file key}. Raises CheckpointError naming missing, unexpected and misshapen
    tensors, or tensors holding NaN/inf, before anything is assigned.
    """
    check_mapping(module, mapping, shapes, what)
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    state = {}
    for name, key in mapping.items():
        tensor = get(key)
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise CheckpointError(f"tensor '{key}' of the {what} holds NaN or inf values: the file is corrupt "
                                  "(or was saved from a diverged training run). Re-download or re-export it.")
        tensor = tensor.reshape(expected[name])  # Linear [o, i] ↔ 1×1 conv [o, i, 1, 1]: same numbers
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor
    module.load_state_dict(state, strict=True, assign=True)
    return module


def _same_numbers(file_shape: tuple, our_shape: tuple) -> bool:
    """Equal shapes, or equal up to trailing 1×1 kernel dims (VAE attention: Linear in diffusers, 1×1 conv in LDM)."""
    strip = lambda s: tuple(s[:2]) if len(s) == 4 and s[2:] == (1, 1) else tuple(s)
    return strip(tuple(file_shape)) == strip(tuple(our_shape))


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# What a file is.
# ---------------------------------------------------------------------------------------------------------------

UNET_INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"
UNET_CROSS_ATTN_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def identify(shapes: dict[str, tuple]) -> str:
    """Name the kind of a single-file checkpoint from its keys and shapes:
    'sd-v1', 'sd-v1-inpainting', 'sd-v2', 'sd-v2-inpainting', 'sdxl', 'vae-only' or 'unknown'."""
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        return "sdxl"  # SDXL keeps its two text encoders under conditioner.embedders.{0,1}
    if UNET_INPUT_CONV in shapes:
        inpainting = shapes[UNET_INPUT_CONV][1] == 9  # 4 latent + 1 mask + 4 masked-image latent channels
        v2 = (any(k.startswith("cond_stage_model.model.") for k in shapes)  # OpenCLIP ViT-H text tower
              or shapes.get(UNET_CROSS_ATTN_K, (0, 768))[1] == 1024)
        return ("sd-v2" if v2 else "sd-v1") + ("-inpainting" if inpainting else "")
    if any(k.startswith(("encoder.", "first_stage_model.encoder.")) for k in shapes):
        return "vae-only"
    return "unknown"


UNSUPPORTED = {
    "sd-v2": "a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder, 1024-wide cross-attention)",
    "sd-v2-inpainting": "a Stable Diffusion 2.x inpainting checkpoint",
    "sdxl": "a Stable Diffusion XL checkpoint (two text encoders, a different UNet)",
    "vae-only": "a standalone VAE file, not a whole model",
    "unknown": "not a Stable Diffusion checkpoint we recognise",
}


# ---------------------------------------------------------------------------------------------------------------
# Loading whole models: official single file or diffusers folder → (text encoder, UNet, VAE, config).
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module
    config: "ModelConfig"
    source: Path
    tokenizer_path: Path | None = None  # a diffusers folder's tokenizer/, when it has one


def _network_classes():
    from .clip import CLIPTextConfig, CLIPTextModel
    from .unet import UNet, UNetConfig
    from .vae import VAE, VAEConfig
    return {"text_encoder": (CLIPTextModel, CLIPTextConfig, "text encoder"),
            "unet": (UNet, UNetConfig, "UNet"),
            "vae": (VAE, VAEConfig, "VAE")}


def load_models(path: str | os.PathLike, *, use_ema: bool = False, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load the three networks from an official single file (.safetensors / .ckpt) or a diffusers folder.

    use_ema: take the UNet weights from the file's `model_ema.*` copy (non-pruned training checkpoints).
    dtype: convert floating-point weights to this dtype while loading, one tensor at a time (None: keep the
    file's dtype). Nothing is returned unless all three networks loaded completely.
    """
    path = Path(path)
    if path.is_dir():
        return _load_diffusers_folder(path, dtype)
    file = TensorFile(path)
    mappings, config = plan_single_file(file.shapes, file.metadata, path, use_ema=use_ema)
    networks = _build_networks(config, mappings, {name: file for name in mappings}, dtype)
    return LoadedModel(**networks, config=config, source=path)


def plan_single_file(shapes: dict[str, tuple], metadata: dict[str, str], path: Path, use_ema: bool = False):
    """Decide, from names and shapes alone, which file tensor fills which parameter of which network, and the
    config. Returns ({network: {our name → file key}}, ModelConfig). Raises before any weight is read."""
    kind = identify(shapes)
    if kind not in ("sd-v1", "sd-v1-inpainting"):
        raise CheckpointError(f"{path} is {UNSUPPORTED[kind]}; ldm_scratch supports SD v1.x only for now "
                              "(v1-4, v1-5, v1-5-inpainting and their fine-tunes). Run `ldm-scratch inspect` on it "
                              "for details.")
    mappings = {c.name: map_component(shapes, c.prefix, c.rules) for c in SINGLE_FILE_COMPONENTS}
    _check_nothing_left_over(shapes, mappings, path)
    if use_ema:
        if not any(k.startswith(EMA_PREFIX) for k in shapes):
            raise CheckpointError(f"{path} has no EMA weights (model_ema.*): it is a pruned/EMA-only file whose UNet "
                                  "weights already are the EMA ones. Load it without use_ema.")
        missing = [k for k in mappings["unet"].values() if ema_key(k) not in shapes]
        if missing:
            raise CheckpointError(f"{path}: EMA copies missing for {len(missing)} UNet tensors: {_list(missing)}")
        mappings["unet"] = {ours: ema_key(key) for ours, key in mappings["unet"].items()}
    return mappings, _config_for(shapes, metadata, mappings, kind, path.stem)


def _check_nothing_left_over(shapes: dict[str, tuple], mappings: dict[str, dict[str, str]], path: Path) -> None:
    used = {key for mapping in mappings.values() for key in mapping.values()}
    left = [k for k in shapes if k not in used and k not in IGNORED_KEYS and not k.startswith(EMA_PREFIX)]
    if left:
        raise CheckpointError(f"{path}: {len(left)} tensor(s) belong to no network we know: {_list(left)}. The file "
                              "may be a merge with extra modules, or a newer architecture. `ldm-scratch inspect` "
                              "lists what it holds.")


def _config_for(shapes, metadata, mappings, kind: str, name: str) -> "ModelConfig":
    from .configs import METADATA_KEY, ModelConfig
    if METADATA_KEY in metadata:  # our own files (the bundled tiny model) carry their config
        return ModelConfig.from_json(metadata[METADATA_KEY])
    classes = _network_classes()
    parts = {network: classes[network][1].from_shapes({ours: shapes[key] for ours, key in mapping.items()})
             for network, mapping in mappings.items()}
    return ModelConfig(**parts, kind=kind, name=name)


def _build_networks(config, mappings, files: dict[str, TensorFile], dtype) -> dict[str, nn.Module]:
    """Build each network on the meta device (no memory), check every mapping first, then fill them from their
    files. All or nothing: an error in any network is raised before any weight is read."""
    modules = {}
    for name, (network_class, _, what) in _network_classes().items():
        with torch.device("meta"):
            modules[name] = network_class(getattr(config, name))
        check_mapping(modules[name], mappings[name], files[name].shapes, what)
    return {name: fill_module(module, mappings[name], files[name].get, files[name].shapes,
                              _network_classes()[name][2], dtype).eval() for name, module in modules.items()}


# The diffusers folder layout: one sub-folder per network with its weights and a config.json.
DIFFUSERS_FOLDERS = {"text_encoder": ("text_encoder", "model"), "unet": ("unet", "diffusion_pytorch_model"),
                     "vae": ("vae", "diffusion_pytorch_model")}
DIFFUSERS_RULES = {"text_encoder": DIFFUSERS_CLIP_RULES, "unet": DIFFUSERS_UNET_RULES, "vae": DIFFUSERS_VAE_RULES}


def _diffusers_weights_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file ({stem}.safetensors or {stem}.bin). A diffusers model folder "
                          "needs unet/, vae/ and text_encoder/ with their weights and config.json.")


def _load_diffusers_folder(root: Path, dtype) -> LoadedModel:
    from .configs import ModelConfig
    classes = _network_classes()
    files, mappings, parts = {}, {}, {}
    for name, (sub, stem) in DIFFUSERS_FOLDERS.items():
        if not (root / sub).is_dir():
            raise CheckpointError(f"{root} is a folder but has no {sub}/ sub-folder: expected the diffusers layout "
                                  "(unet/, vae/, text_encoder/, tokenizer/) or pass a single .safetensors file.")
        files[name] = TensorFile(_diffusers_weights_file(root / sub, stem))
        mappings[name] = map_component(files[name].keys(), "", DIFFUSERS_RULES[name])
        shapes = {ours: files[name].shapes[key] for ours, key in mappings[name].items()}
        json_path = root / sub / "config.json"
        hints = _head_hints(name, read_json(json_path)) if json_path.is_file() else {}
        parts[name] = classes[name][1].from_shapes(shapes, **hints)
    kind = "sd-v1-inpainting" if parts["unet"].in_channels == 9 else "sd-v1"
    config = ModelConfig(**parts, kind=kind, name=root.name)
    networks = _build_networks(config, mappings, files, dtype)
    tokenizer = root / "tokenizer"
    return LoadedModel(**networks, config=config, source=root,
                       tokenizer_path=tokenizer if (tokenizer / "merges.txt").is_file() else None)


def _head_hints(network: str, diffusers_config: dict) -> dict:
    """Head counts leave no trace in weight shapes; a diffusers folder's config.json states them."""
    if network == "text_encoder" and "num_attention_heads" in diffusers_config:
        return {"head_dim": diffusers_config["hidden_size"] // diffusers_config["num_attention_heads"]}
    heads = diffusers_config.get("attention_head_dim")  # UNet: misnamed in diffusers, it holds SD v1's head COUNT
    if network == "unet" and heads is not None:
        return {"n_heads": heads[0] if isinstance(heads, list) else heads}
    return {}


# ---------------------------------------------------------------------------------------------------------------
# Writing our networks back in the official single-file layout (the bundled tiny model is stored this way).
# ---------------------------------------------------------------------------------------------------------------

def reference_keys() -> dict[str, dict[str, list[int]]]:
    """The official SD v1 key names and shapes, by section (unet, vae, text_encoder, ddpm_buffers, …)."""
    return read_json(Path(__file__).parent / "keys" / "sd-v1-checkpoint-keys.json")


def official_names(module: nn.Module, component: Component, official_keys: Iterable[str]) -> dict[str, str]:
    """{our name → official key} by running the rule table forwards over the official key list.

    A model with SD v1's topology (same levels and blocks, any widths; any number of CLIP layers up to 12) has
    official names for all of its tensors; anything else cannot be written in this layout and is an error."""
    ours = module.state_dict().keys()
    names = {}
    for key in official_keys:
        if key.startswith(component.prefix) and key not in IGNORED_KEYS:
            name = rename(key[len(component.prefix):], component.rules)
            if name in ours:
                names[name] = key
    missing = ours - names.keys()
    if missing:
        raise CheckpointError(f"the {component.name} has tensors with no official SD v1 name: {_list(missing)}")
    return names


def save_official(path: str | os.PathLike, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module,
                  config: "ModelConfig", *, overwrite: bool = False) -> Path:
    """Write the three networks as one official-layout .safetensors file with `config` in its metadata."""
    from safetensors.torch import save_file
    from .configs import METADATA_KEY
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass overwrite=True, or choose a new name)")
    reference = {k: v for section in ("unet", "vae", "text_encoder") for k, v in reference_keys()[section].items()}
    tensors = {}
    for component, module in zip(SINGLE_FILE_COMPONENTS, (unet, vae, text_encoder)):
        state = module.state_dict()
        for ours, official in official_names(module, component, reference).items():
            tensor = state[ours].detach().cpu()
            if len(reference[official]) == 4 and tensor.dim() == 2:
                tensor = tensor[:, :, None, None]  # the VAE's attention: our Linear [o, i] is a 1×1 conv officially
            tensors[official] = tensor.contiguous()
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: config.to_json()})
    os.replace(tmp, path)  # never leave a half-written file under the real name
    return path


# ---------------------------------------------------------------------------------------------------------------
# `ldm-scratch inspect FILE`: what a file is, without loading its weights.
# ---------------------------------------------------------------------------------------------------------------

def describe(path: str | os.PathLike) -> str:
    """A human-readable report: kind, dtypes, parameters per network, and every tensor no rule accounts for."""
    path = Path(path)
    if path.is_dir():
        lines = [f"{path}: diffusers folder"]
        for name, (sub, stem) in DIFFUSERS_FOLDERS.items():
            try:
                file = TensorFile(_diffusers_weights_file(path / sub, stem))
            except CheckpointError as error:
                lines.append(f"  {name}: {error}")
                continue
            mapping = map_component(file.keys(), "", DIFFUSERS_RULES[name])
            unmapped = sorted(set(file.keys()) - set(mapping.values()))
            lines.append(f"  {name:13s} {_count(file, mapping.values()):>13,} parameters  "
                         f"{_dtypes(file, mapping.values())}  ({file.path.name})")
            if unmapped:
                lines.append(f"    unmapped: {_list(unmapped)}")
        return "\n".join(lines)
    file = TensorFile(path)
    kind = identify(file.shapes)
    total = sum(_numel(s) for s in file.shapes.values())
    lines = [f"{path}", f"  kind:       {kind}" + ("" if kind.startswith("sd-v1") else f"  ({UNSUPPORTED[kind]}; "
                                                   "not supported yet)"),
             f"  tensors:    {len(file.shapes):,} ({total:,} numbers, dtypes {_dtypes(file, file.keys())})"]
    if kind not in ("sd-v1", "sd-v1-inpainting"):
        prefixes = sorted({k.split(".")[0] for k in file.keys()})
        lines.append(f"  top-level prefixes: {', '.join(prefixes)}")
        return "\n".join(lines)
    mappings = {c.name: map_component(file.keys(), c.prefix, c.rules) for c in SINGLE_FILE_COMPONENTS}
    for component in SINGLE_FILE_COMPONENTS:
        keys = mappings[component.name].values()
        lines.append(f"  {component.name:13s} {_count(file, keys):>13,} parameters  {_dtypes(file, keys)}  "
                     f"({component.prefix}*)")
    used = {k for m in mappings.values() for k in m.values()}
    ema = [k for k in file.keys() if k.startswith(EMA_PREFIX)]
    ignored = [k for k in file.keys() if k in IGNORED_KEYS and not k.startswith(EMA_PREFIX)]
    unmapped = [k for k in file.keys() if k not in used and k not in IGNORED_KEYS and not k.startswith(EMA_PREFIX)]
    lines.append(f"  EMA copy:   {'yes, ' + format(len(ema), ',') + ' tensors (load with use_ema=True)' if ema else 'no'}")
    lines.append(f"  allowed, not loaded: {len(ignored)} ({_list(ignored, 4) or 'none'})")
    from .configs import METADATA_KEY
    if METADATA_KEY in file.metadata:
        lines.append(f"  config (metadata): {file.metadata[METADATA_KEY]}")
    lines.append(f"  unmapped:   {len(unmapped)}" + (f" — {_list(unmapped)}" if unmapped else " (every tensor accounted for)"))
    return "\n".join(lines)


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _count(file: TensorFile, keys: Iterable[str]) -> int:
    return sum(_numel(file.shapes[k]) for k in keys)


def _dtypes(file: TensorFile, keys: Iterable[str]) -> str:
    return "/".join(sorted({file.dtypes[k] for k in keys})) or "-"
