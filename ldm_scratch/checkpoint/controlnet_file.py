"""Loading and saving ControlNets, strictly: `cn = ldm_scratch.load_controlnet(path)`.

Accepted: an official file (.pth through `torch.load(weights_only=True)` only, .safetensors, fp32 or fp16) with
keys under `control_model.` (or with that prefix stripped), also when a whole SD v1 model sits beside it (the
"control_sd15_*" files: its model.diffusion_model.* / first_stage_model.* / cond_stage_model.* tensors are
recognised and left alone); a diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors);
our own files, which carry the config in their metadata. Every ControlNet tensor is used exactly once and every
parameter filled, else CheckpointError names the offenders.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..controlnet import ControlNet, ControlNetConfig
from ..files import replacing
from ..unet import UNetConfig
from .controlnet_keys import (CONTROL_PREFIX, controlnet_config_from_shapes, controlnet_keymap,
                              diffusers_controlnet_rules, hint_stages_of_keys)
from .keymap import IGNORED_KEYS, SINGLE_FILE_PREFIXES, UNetLayout, diffusers_levels, map_component
from .loading import _config_hints, check_mapping, diffusers_weights_file, fill_module
from .saving import official_names
from .tensor_file import CheckpointError, TensorFile, key_list, read_json

CONTROLNET_METADATA_KEY = "ldm_scratch_controlnet_config"
SD_PREFIXES = tuple(SINGLE_FILE_PREFIXES.values()) + ("model_ema.", "cond_stage_model.")


def is_controlnet(keys) -> bool:
    """True for a file holding a ControlNet in the official layout (with or without the prefix, or diffusers')."""
    keys = set(keys)
    return any(k.startswith((CONTROL_PREFIX + "input_hint_block.", "input_hint_block.",
                             "controlnet_cond_embedding.")) for k in keys)


def is_controlnet_path(path: Path) -> bool:
    """True for a ControlNet file or a diffusers ControlNet folder (config.json + weights, no unet/ sub-folder)."""
    try:
        if path.is_dir():
            if not (path / "config.json").is_file() or (path / "unet").is_dir():
                return False
            return is_controlnet(TensorFile(diffusers_weights_file(path, "diffusion_pytorch_model")).keys())
        return is_controlnet(TensorFile(path).keys())
    except CheckpointError:
        return False


def load_controlnet(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                    unet_config: UNetConfig | None = None) -> ControlNet:
    """A ControlNet from an official file, a diffusers folder or our own file (see the module docstring).

    dtype: the weights' dtype (None keeps the file's; fp16 files are converted to float32 by default).
    unet_config: the config of the UNet it will steer, for what an official file's shapes do not show (head
    count, GroupNorm groups); default SD v1's (8 heads, 32 groups). Ignored for files that carry their config."""
    path = Path(path)
    if path.is_dir():
        json_path = path / "config.json"
        if not json_path.is_file():
            raise CheckpointError(f"{path} is a folder without config.json: a diffusers ControlNet folder holds "
                                  "config.json and diffusion_pytorch_model.safetensors")
        file = TensorFile(diffusers_weights_file(path, "diffusion_pytorch_model"))
        if not is_controlnet(file.keys()):
            raise CheckpointError(f"{path} is not a diffusers ControlNet folder (no controlnet_cond_embedding.*)")
        mapping = map_component(file.keys(), "", diffusers_controlnet_rules(diffusers_levels(file.keys())))
        config = None
        hints = {**_hints_from(unet_config), **_config_hints("unet", read_json(json_path))}
    else:
        file = TensorFile(path)
        if not is_controlnet(file.keys()):
            raise CheckpointError(f"{path} is not a ControlNet: it has no input_hint_block.* (official) or "
                                  "controlnet_cond_embedding.* (diffusers) tensors. `ldm-scratch inspect` says what "
                                  "it is; a Stable Diffusion model loads with load_pipeline.")
        prefix = CONTROL_PREFIX if any(k.startswith(CONTROL_PREFIX) for k in file.keys()) else ""
        mapping = _official_mapping(file, prefix, path)
        config, hints = _config_from_metadata(file.metadata, path), _hints_from(unet_config)
    shapes = {ours: file.shapes[key] for ours, key in mapping.items()}
    if config is None:
        try:
            config = controlnet_config_from_shapes(shapes, **hints)
        except (KeyError, IndexError, ValueError) as error:
            raise CheckpointError(f"{path}: cannot read a ControlNet's sizes from its tensors ({error}); the file "
                                  "is damaged, or its UNet needs unet_config= (head count, GroupNorm groups)"
                                  ) from None
    with torch.device("meta"):
        controlnet = ControlNet(config)
    check_mapping(controlnet, mapping, file.shapes, "ControlNet")
    return fill_module(controlnet, mapping, file.get, file.shapes, "ControlNet", dtype).eval()


def _hints_from(unet_config: UNetConfig | None) -> dict:
    """unet_config_from_shapes' hints taken from the UNet a ControlNet will steer."""
    if unet_config is None:
        return {}
    hints = {"n_heads": unet_config.n_heads, "norm_groups": unet_config.norm_groups}
    for name in ("head_dim", "upcast_attention"):        # SD 2 fields, where the UNet config has them
        if getattr(unet_config, name, None) is not None:
            hints[name] = getattr(unet_config, name)
    return hints


def _official_mapping(file: TensorFile, prefix: str, path: Path) -> dict[str, str]:
    """{our name → file key} for the ControlNet tensors; anything that is neither ControlNet nor a whole SD model
    beside it is an error."""
    inner = [k[len(prefix):] for k in file.keys() if k.startswith(prefix)]
    layout = UNetLayout.of_keys(inner)
    mapping = map_component(file.keys(), prefix, controlnet_keymap(layout, hint_stages_of_keys(inner)))
    if not prefix:   # prefix-less file: the beside-model prefixes cannot occur
        left = [k for k in file.keys() if k not in mapping.values()]
    else:
        left = [k for k in file.keys() if not k.startswith(prefix) and not k.startswith(SD_PREFIXES)
                and k not in IGNORED_KEYS]
    if left:
        raise CheckpointError(f"{path}: {len(left)} tensor(s) belong to no ControlNet: {key_list(left)}")
    return mapping


def _config_from_metadata(metadata: dict[str, str], path: Path) -> ControlNetConfig | None:
    if CONTROLNET_METADATA_KEY not in metadata:
        return None
    try:
        fields = json.loads(metadata[CONTROLNET_METADATA_KEY])
        return ControlNetConfig(**{**fields, "unet": UNetConfig(**fields["unet"])})
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path}: its '{CONTROLNET_METADATA_KEY}' metadata is invalid ({error}); re-save the "
                              "ControlNet with ldm_scratch (save_controlnet)") from None


def save_controlnet(path: str | os.PathLike, controlnet: ControlNet, *, overwrite: bool = False,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a ControlNet as an official-layout .safetensors (control_model.*), its config in the metadata."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass overwrite=True / --force)")
    config = controlnet.config
    n_stages = len(config.hint_widths) - 1
    keymap = controlnet_keymap(UNetLayout.of(config.unet), n_stages)
    state = controlnet.state_dict()
    tensors = {}
    for ours, official in official_names(controlnet, keymap, "ControlNet").items():
        tensor = state[ours].detach().cpu()
        tensors[CONTROL_PREFIX + official] = (tensor.to(dtype) if dtype is not None else tensor).contiguous()
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata={CONTROLNET_METADATA_KEY: json.dumps(asdict(config))})
    return path


def describe_controlnet(path: str | os.PathLike) -> str:
    """`ldm-scratch inspect` for a ControlNet file or diffusers ControlNet folder: kind, sizes, every tensor's fate."""
    path = Path(path)
    file = TensorFile(diffusers_weights_file(path, "diffusion_pytorch_model") if path.is_dir() else path)
    beside = sorted({p for k in file.keys() for p in SD_PREFIXES if k.startswith(p)})
    layout = "diffusers folder" if path.is_dir() else "official layout" + (
        f", {CONTROL_PREFIX}*" if any(k.startswith(CONTROL_PREFIX) for k in file.keys()) else ", no prefix")
    lines = [f"{path}", f"  kind:       controlnet ({layout})"
             + (f", beside a whole SD model ({', '.join(p + '*' for p in beside)}; not loaded)" if beside else "")]
    try:                                          # names and shapes only: no weight is read
        mapping = (map_component(file.keys(), "", diffusers_controlnet_rules(diffusers_levels(file.keys())))
                   if path.is_dir() else _official_mapping(file, CONTROL_PREFIX if layout.endswith("*") else "", path))
        count = sum(_numel(file.shapes[k]) for k in mapping.values())
        dtypes = "/".join(sorted({file.dtypes[k] for k in mapping.values()}))
        widths = [file.shapes[k][0] for ours, k in mapping.items()
                  if ours.startswith("zero_convs.") and ours.endswith(".weight")]
        stages = len({o.split(".")[2] for o in mapping if o.startswith("hint_encoder.stages.")})
        lines += [f"  parameters: {count:,} in {len(mapping)} tensors ({dtypes})",
                  f"  hint:       {stages} stride-2 stages (for a VAE downsampling ×{2 ** stages}); "
                  f"{len(widths)} zero convs + 1 middle, widths {sorted(set(widths))}",
                  "  config (metadata): " + ("yes" if CONTROLNET_METADATA_KEY in file.metadata
                                             else "no (read from shapes)")]
    except CheckpointError as error:
        lines.append(f"  not loadable: {error}")
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
