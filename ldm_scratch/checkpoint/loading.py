"""Loading whole models: an official single file (.safetensors / .ckpt) or a diffusers folder → the text encoder,
UNet and VAE of ours, plus the `ModelConfig` that built them.

Loading is strict: every parameter of our module must be filled exactly once, every tensor in the file must be
used or be on the short allow-list `IGNORED_KEYS`, and shapes must agree. Anything else raises `CheckpointError`
listing the offending keys, and nothing is half-loaded.

Memory: modules are built on the `meta` device (no storage) and the file's tensors are assigned into them
(`load_state_dict(assign=True)`), so the weights exist once in memory, not twice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..configs import METADATA_KEY, ModelConfig
from .keymap import (DIFFUSERS_CLIP_RULES, EMA_PREFIX, IGNORED_KEYS, SINGLE_FILE_PREFIXES, clip_config_from_shapes,
                     diffusers_levels, diffusers_unet_rules, diffusers_vae_rules, ema_key, map_component,
                     map_single_file, unet_config_from_shapes, vae_config_from_shapes)
from .openclip_keys import OPENCLIP_PREFIX, FusedView, map_openclip, source_keys, unused_openclip_keys
from .prediction import choose_prediction_type
from .tensor_file import CheckpointError, TensorFile, key_list, read_json
from .upscaler_keys import UPSCALER_NUMBERS, UPSCALER_UNET_HINTS, check_upscaler_file, low_scale_buffers


@dataclass
class LoadedModel:
    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module
    config: ModelConfig
    source: Path
    tokenizer_path: Path | None = None  # a diffusers folder's tokenizer/, when it has one
    prediction_reason: str = ""         # why config.prediction_type is what it is (checkpoint/prediction.py)


def _network_classes():
    """{network: (module class, config-from-shapes, what to call it in messages)}."""
    from ..clip import CLIPTextModel
    from ..unet import UNet
    from ..vae import VAE
    return {"text_encoder": (CLIPTextModel, clip_config_from_shapes, "text encoder"),
            "unet": (UNet, unet_config_from_shapes, "UNet"),
            "vae": (VAE, vae_config_from_shapes, "VAE")}


def load_models(path: str | os.PathLike, *, use_ema: bool = False, dtype: torch.dtype | None = None,
                prediction_type: str | None = None) -> LoadedModel:
    """Load the three networks from an official single file (.safetensors / .ckpt) or a diffusers folder.

    use_ema: take the UNet weights from the file's `model_ema.*` copy (non-pruned training checkpoints).
    dtype: convert floating-point weights to this dtype while loading, one tensor at a time (None: keep the
    file's dtype). prediction_type: "epsilon" or "v_prediction" to override the detection (prediction.py).
    Nothing is returned unless all three networks loaded completely.
    """
    path = Path(path)
    own_config = False
    if path.is_dir():
        loaded = _load_diffusers_folder(path, dtype)
    else:
        file = TensorFile(path)
        own_config = METADATA_KEY in file.metadata
        mappings, config = plan_single_file(file.shapes, file.metadata, path, use_ema=use_ema)
        files = {name: file for name in mappings}
        if config.kind.startswith("sd-v2"):
            files["text_encoder"] = FusedView(file)   # OpenCLIP's fused q/k/v, read as three tensors
        networks = _build_networks(config, mappings, files, dtype)
        loaded = LoadedModel(**networks, config=config, source=path)
    if own_config and prediction_type is None:
        loaded.prediction_reason = "the file's own config (ldm_scratch metadata) says so"
        return loaded
    chosen, loaded.prediction_reason = choose_prediction_type(path, loaded.config.kind, prediction_type)
    loaded.config.prediction_type = chosen
    if loaded.config.kind == "sd-v2" and chosen == "v_prediction":
        loaded.config.image_size = 768                # 2.x v-models are the 768² ones (512-base: 512²)
    return loaded


# ---------------------------------------------------------------------------------------------------------------
# What a file is, and the plan for an official single file.
# ---------------------------------------------------------------------------------------------------------------

UNET_INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"
UNET_CROSS_ATTN_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"

UNSUPPORTED = {
    "sd-v2": "a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder, 1024-wide cross-attention)",
    "sd-v2-inpainting": "a Stable Diffusion 2.x inpainting checkpoint",
    "sdxl": "a Stable Diffusion XL checkpoint (two text encoders, a different UNet)",
    "vae-only": "a standalone VAE only (encoder.* / first_stage_model.*): no UNet and no text encoder",
    "unet-only": "a UNet only (model.diffusion_model.*, or a diffusers unet/ file): no VAE and no text encoder",
    "text-encoder-only": "a CLIP text encoder only (cond_stage_model.* or text_model.*): no UNet and no VAE",
    "unknown": "not a Stable Diffusion checkpoint we recognise",
}
PARTS = ("vae-only", "unet-only", "text-encoder-only")  # one network of a model, not a whole one


def identify(shapes: dict[str, tuple]) -> str:
    """Name the kind of a single-file checkpoint from its keys and shapes: 'sd-v1', 'sd-v1-inpainting', 'sd-v2',
    'sd-v2-inpainting', 'sd-v2-upscaler', 'sdxl', one network alone ('vae-only', 'unet-only', 'text-encoder-only')
    or 'unknown'."""
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        return "sdxl"  # SDXL keeps its two text encoders under conditioner.embedders.{0,1}
    if UNET_INPUT_CONV in shapes and not any(k.startswith(("first_stage_model.", "cond_stage_model.")) for k in shapes):
        return "unet-only"
    if "conv_in.weight" in shapes and "time_embedding.linear_1.weight" in shapes:
        return "unet-only"  # a diffusers unet/diffusion_pytorch_model.safetensors passed on its own
    if UNET_INPUT_CONV in shapes:
        second = lambda key, default: tuple(shapes.get(key, (0, default)))[1:2] or (None,)  # a damaged file: any rank
        inpainting = second(UNET_INPUT_CONV, 4)[0] == 9  # 4 latent + 1 mask + 4 masked-image latent channels
        v2 = (any(k.startswith("cond_stage_model.model.") for k in shapes)  # OpenCLIP ViT-H text tower
              or second(UNET_CROSS_ATTN_K, 768)[0] == 1024)
        if v2 and second(UNET_INPUT_CONV, 4)[0] == 7:    # 4 latent + 3 low-resolution RGB channels
            return "sd-v2-upscaler"
        return ("sd-v2" if v2 else "sd-v1") + ("-inpainting" if inpainting else "")
    if any(k.startswith(("encoder.", "first_stage_model.encoder.")) for k in shapes):
        return "vae-only"
    weights = [k for k in shapes if k not in IGNORED_KEYS]
    if weights and all(k.startswith(("cond_stage_model.", "text_model.")) for k in weights):
        return "text-encoder-only"  # CompVis' text side cut out of a model, or transformers' CLIPTextModel file
    return "unknown"


def plan_single_file(shapes: dict[str, tuple], metadata: dict[str, str], path: Path, use_ema: bool = False):
    """Decide, from names and shapes alone, which file tensor fills which parameter of which network, and the
    config. Returns ({network: {our name → file key}}, ModelConfig). Raises before any weight is read."""
    kind = identify(shapes)
    if kind in PARTS:
        raise CheckpointError(f"{path} is not a whole Stable Diffusion checkpoint: it holds {UNSUPPORTED[kind]}. "
                              "Loading needs the UNet, the VAE and the text encoder together: an SD v1 single file "
                              "(e.g. v1-5-pruned-emaonly.safetensors) or a diffusers folder.")
    if kind not in SUPPORTED:
        raise CheckpointError(f"{path} is {UNSUPPORTED[kind]}; ldm_scratch supports SD v1.x and 2.x (v1-4, v1-5, "
                              "v2-1 768-v / 512-base, the inpainting models and their fine-tunes). Run "
                              "`ldm-scratch inspect` on it for details.")
    v2 = kind.startswith("sd-v2")
    prefixes = {**SINGLE_FILE_PREFIXES, **({"text_encoder": OPENCLIP_PREFIX} if v2 else {})}
    absent = [f"{network} ({prefix}*)" for network, prefix in prefixes.items()
              if not any(k.startswith(prefix) for k in shapes)]
    if absent:
        raise CheckpointError(f"{path} is an incomplete {'Stable Diffusion 2.x' if v2 else 'SD v1'} checkpoint: it "
                              f"has no {' and no '.join(absent)}. Loading needs the UNet, the VAE and the text "
                              "encoder together in one file.")
    if kind == "sd-v2-upscaler":
        check_upscaler_file(shapes, path)
    config = config_from_metadata(metadata, path)   # our own files: checked before any weight is read
    mappings = map_single_file(shapes)
    if v2:
        mappings["text_encoder"] = map_openclip(shapes)   # OpenCLIP ViT-H: its own table (openclip_keys.py)
    _check_nothing_left_over(shapes, mappings, path)
    if use_ema:
        if not any(k.startswith(EMA_PREFIX) for k in shapes):
            raise CheckpointError(f"{path} has no EMA weights (model_ema.*): it is a pruned/EMA-only file whose UNet "
                                  "weights already are the EMA ones. Load it without use_ema.")
        missing = [k for k in mappings["unet"].values() if ema_key(k) not in shapes]
        if missing:
            raise CheckpointError(f"{path}: EMA copies missing for {len(missing)} UNet tensors: {key_list(missing)}")
        mappings["unet"] = {ours: ema_key(key) for ours, key in mappings["unet"].items()}
    if config is not None:
        return mappings, config
    shapes_of = FusedView.split_shapes(shapes) if v2 else shapes
    hints = {**V2_HINTS, "unet": UPSCALER_UNET_HINTS} if kind == "sd-v2-upscaler" else V2_HINTS if v2 else {}
    parts = {network: from_shapes({ours: shapes_of[key] for ours, key in mappings[network].items()},
                                  **hints.get(network, {}))
             for network, (_, from_shapes, _) in _network_classes().items()}
    return mappings, ModelConfig(**parts, kind=kind, name=path.stem, **KIND_NUMBERS.get(kind, {}))


SUPPORTED = ("sd-v1", "sd-v1-inpainting", "sd-v2", "sd-v2-inpainting", "sd-v2-upscaler")
KIND_NUMBERS = {"sd-v2-upscaler": UPSCALER_NUMBERS}   # latent scale, β, size from the yaml (upscaler_keys.py)
# What SD 2's shapes do not show (v2-inference-v.yaml): OpenCLIP's exact GELU; 64-channel UNet heads
# (num_head_channels: 64); upcast attention, a no-op in float32 and what 2.1 needs in float16 (spatial_transformer.py).
V2_HINTS = {"text_encoder": {"activation": "gelu"}, "unet": {"head_dim": 64, "upcast_attention": True}, "vae": {}}


def config_from_metadata(metadata: dict[str, str], path: Path) -> ModelConfig | None:
    """The `ModelConfig` our own files (the bundled tiny model, training exports) carry in their metadata, checked
    field by field (configs.py); None for a file without one (official files: the config comes from the shapes)."""
    if METADATA_KEY not in metadata:
        return None
    try:
        return ModelConfig.from_json(metadata[METADATA_KEY])
    except ValueError as error:
        raise CheckpointError(f"{path}: its '{METADATA_KEY}' metadata (the model's config) is invalid: {error}. The "
                              "file was edited or written by another tool; re-export it with ldm_scratch "
                              "(checkpoint.save_official) or download it again.") from None


def _check_nothing_left_over(shapes: dict[str, tuple], mappings: dict[str, dict[str, str]], path: Path) -> None:
    used = {key for mapping in mappings.values() for key in source_keys(mapping)}
    used |= set(unused_openclip_keys(shapes))       # SD 2: the last block, text_projection, logit_scale, by name
    used |= set(low_scale_buffers(shapes))          # ×4 upscaler: its noise-augmentation schedule, by name
    left = [k for k in shapes if k not in used and k not in IGNORED_KEYS and not k.startswith(EMA_PREFIX)]
    if left:
        raise CheckpointError(f"{path}: {len(left)} tensor(s) belong to no network we know: {key_list(left)}. The "
                              "file may be a merge with extra modules, or a newer architecture. `ldm-scratch inspect` "
                              "lists what it holds.")


# ---------------------------------------------------------------------------------------------------------------
# The diffusers folder layout: one sub-folder per network with its weights and a config.json.
# ---------------------------------------------------------------------------------------------------------------

DIFFUSERS_FOLDERS = {"text_encoder": ("text_encoder", "model"), "unet": ("unet", "diffusion_pytorch_model"),
                     "vae": ("vae", "diffusion_pytorch_model")}


def diffusers_rules(network: str, keys) -> list:
    """The rule table for one network's file in a diffusers folder (the UNet's and VAE's follow its levels)."""
    if network == "text_encoder":
        return DIFFUSERS_CLIP_RULES
    return (diffusers_unet_rules if network == "unet" else diffusers_vae_rules)(diffusers_levels(keys))


def diffusers_weights_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file ({stem}.safetensors or {stem}.bin). A diffusers model folder "
                          "needs unet/, vae/ and text_encoder/ with their weights and config.json.")


def _load_diffusers_folder(root: Path, dtype) -> LoadedModel:
    files, mappings, parts = {}, {}, {}
    for name, (sub, stem) in DIFFUSERS_FOLDERS.items():
        if not (root / sub).is_dir():
            raise CheckpointError(f"{root} is a folder but has no {sub}/ sub-folder: expected the diffusers layout "
                                  "(unet/, vae/, text_encoder/, tokenizer/) or pass a single .safetensors file.")
        files[name] = TensorFile(diffusers_weights_file(root / sub, stem))
        mappings[name] = map_component(files[name].keys(), "", diffusers_rules(name, files[name].keys()))
        shapes = {ours: files[name].shapes[key] for ours, key in mappings[name].items()}
        json_path = root / sub / "config.json"
        hints = _config_hints(name, read_json(json_path)) if json_path.is_file() else {}
        parts[name] = _network_classes()[name][1](shapes, **hints)
    kind = ("sd-v2" if parts["text_encoder"].activation == "gelu" else "sd-v1") + (   # OpenCLIP's GELU: SD 2
        "-inpainting" if parts["unet"].in_channels == 9 else "-upscaler" if parts["unet"].num_classes else "")
    config = ModelConfig(**parts, kind=kind, name=root.name, **KIND_NUMBERS.get(kind, {}))
    networks = _build_networks(config, mappings, files, dtype)
    tokenizer = root / "tokenizer"
    return LoadedModel(**networks, config=config, source=root,
                       tokenizer_path=tokenizer if (tokenizer / "merges.txt").is_file() else None)


def _config_hints(network: str, diffusers_config: dict) -> dict:
    """What leaves no trace in weight shapes, read from a diffusers folder's config.json: head counts, and the
    GroupNorm group counts (32 in SD v1; a small model may use fewer)."""
    if network == "text_encoder":
        hints = {"activation": "gelu"} if diffusers_config.get("hidden_act") == "gelu" else {}   # OpenCLIP (SD 2)
        if "num_attention_heads" not in diffusers_config:
            return hints
        return {**hints, "head_dim": diffusers_config["hidden_size"] // diffusers_config["num_attention_heads"]}
    hints = {"norm_groups": diffusers_config["norm_num_groups"]} if "norm_num_groups" in diffusers_config else {}
    heads = diffusers_config.get("attention_head_dim")  # UNet: misnamed in diffusers, it holds SD v1's head COUNT
    if network == "unet" and heads is not None:
        hints["n_heads"] = heads[0] if isinstance(heads, list) else heads
        if isinstance(heads, list) and len(set(heads)) > 1:   # SD 2: [5, 10, 20, 20] heads = widths / 64
            hints["head_dim"] = diffusers_config["block_out_channels"][0] // heads[0]
        hints["upcast_attention"] = bool(diffusers_config.get("upcast_attention", False))
    return hints


# ---------------------------------------------------------------------------------------------------------------
# Building and filling the networks, strictly.
# ---------------------------------------------------------------------------------------------------------------

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
        problems.append(f"missing {len(missing)} tensor(s) for our {what} parameters: {key_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {key_list(unexpected)}")
    if misshapen:
        problems.append(f"{len(misshapen)} tensor(s) with the wrong shape: {key_list(misshapen, 6)}")
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
