"""`ldm-scratch inspect FILE`: what a checkpoint file or diffusers folder holds, without loading its weights."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..configs import METADATA_KEY
from .controlnet_file import describe_controlnet, is_controlnet_path
from .keymap import EMA_PREFIX, IGNORED_KEYS, SINGLE_FILE_PREFIXES, map_component, map_single_file
from .loading import (DIFFUSERS_FOLDERS, PARTS, SUPPORTED, UNSUPPORTED, config_from_metadata, diffusers_rules,
                      diffusers_weights_file, identify, UNET_INPUT_CONV)
from .openclip_keys import OPENCLIP_PREFIX, map_openclip, source_keys, unused_openclip_keys
from .prediction import choose_prediction_type
from .tensor_file import CheckpointError, TensorFile, key_list, read_json
from .upscaler_keys import low_scale_buffers


def describe(path: str | os.PathLike) -> str:
    """A human-readable report: kind, dtypes, parameters per network, and every tensor no rule accounts for."""
    path = Path(path)
    if is_controlnet_path(path):                 # a ControlNet file or folder: its own report (controlnet_file.py)
        return describe_controlnet(path)
    if path.is_dir():
        return _describe_folder(path)
    file = TensorFile(path)
    kind = identify(file.shapes)
    total = sum(_numel(s) for s in file.shapes.values())
    note = "" if kind in SUPPORTED else f"  ({UNSUPPORTED[kind]}" + (
        "; not a whole model)" if kind in PARTS else "; not supported yet)")
    if kind == "sd-v1" and tuple(file.shapes.get(UNET_INPUT_CONV, ()))[1:2] == (8,):   # latents + image latents
        note = "  (InstructPix2Pix: 8-channel UNet input, noisy latents + image latents; use pipe.instruct)"
    if kind == "sd-v2-upscaler":
        note = "  (SD 2 ×4 upscaler: 7-channel UNet input, latents + the noised low-res image; use pipe.upscale)"
    lines = [f"{path}", f"  kind:       {kind}{note}",
             f"  tensors:    {len(file.shapes):,} ({total:,} numbers, dtypes {_dtypes(file, file.keys())})"]
    if kind not in SUPPORTED:
        prefixes = sorted({k.split(".")[0] for k in file.keys()})
        lines.append(f"  top-level prefixes: {', '.join(prefixes)}")
        return "\n".join(lines)
    return "\n".join(lines + _describe_sd_v1(file, kind))


def _describe_folder(path: Path) -> str:
    """A diffusers folder, network by network. Raises CheckpointError for a folder that is not one (none of the
    three sub-folders) and for one the loader would refuse (a network missing or unreadable), report included."""
    subs = [sub for sub, _ in DIFFUSERS_FOLDERS.values()]
    if not any((path / sub).is_dir() for sub in subs):
        contents = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        held = "it is empty" if not contents else f"it holds {', '.join(contents[:8])}" + (
            ", …" if len(contents) > 8 else "")
        raise CheckpointError(f"{path} is not a diffusers model folder: it has none of the sub-folders {'/, '.join(subs)}/ "
                              f"({held}). Pass a diffusers model folder or a single .safetensors / .ckpt file.")
    lines, problems = [f"{path}: diffusers folder"], []
    for name, (sub, stem) in DIFFUSERS_FOLDERS.items():
        try:
            file = TensorFile(diffusers_weights_file(path / sub, stem))
        except CheckpointError as error:
            lines.append(f"  {name}: {error}")
            problems.append(name)
            continue
        mapping = map_component(file.keys(), "", diffusers_rules(name, file.keys()))
        unmapped = sorted(set(file.keys()) - set(mapping.values()))
        lines.append(f"  {name:13s} {_count(file, mapping.values()):>13,} parameters  "
                     f"{_dtypes(file, mapping.values())}  ({file.path.name})")
        if unmapped:
            lines.append(f"    unmapped: {key_list(unmapped)}")
    if problems:
        raise CheckpointError("\n".join(lines) + f"\nnot a loadable diffusers model: {', '.join(problems)} "
                              "missing or unreadable (a diffusers folder needs unet/, vae/ and text_encoder/).")
    text_config = path / "text_encoder" / "config.json"
    v2 = text_config.is_file() and read_json(text_config).get("hidden_act") == "gelu"   # OpenCLIP: SD 2
    unet_config = path / "unet" / "config.json"
    if v2 and unet_config.is_file() and read_json(unet_config).get("num_class_embeds"):   # a noise-level label
        lines.append("  kind:       sd-v2-upscaler  (SD 2 ×4 upscaler: latents + the noised low-res image; use "
                     "pipe.upscale)")
    prediction, reason = choose_prediction_type(path, "sd-v2" if v2 else "sd-v1")
    lines.append(f"  prediction: {prediction} ({reason})")
    return "\n".join(lines)


def _describe_sd_v1(file: TensorFile, kind: str = "sd-v1") -> list[str]:
    """The lines for an SD v1 / v2 single file: parameters per network, EMA, allowed extras, config, prediction
    type and why, unmapped."""
    lines = []
    mappings = map_single_file(file.keys())
    prefixes = dict(SINGLE_FILE_PREFIXES)
    if kind.startswith("sd-v2"):   # OpenCLIP ViT-H text tower (openclip_keys.py)
        mappings["text_encoder"], prefixes["text_encoder"] = map_openclip(file.keys()), OPENCLIP_PREFIX
    for network, prefix in prefixes.items():
        keys = source_keys(mappings[network])
        lines.append(f"  {network:13s} {_count(file, keys):>13,} parameters  {_dtypes(file, keys)}  ({prefix}*)")
    used = {k for m in mappings.values() for k in source_keys(m)}
    ema = [k for k in file.keys() if k.startswith(EMA_PREFIX)]
    unused_text = set(unused_openclip_keys(file.keys())) | set(low_scale_buffers(file.keys()))   # allowed by name
    ignored = [k for k in file.keys() if (k in IGNORED_KEYS or k in unused_text) and not k.startswith(EMA_PREFIX)]
    unmapped = [k for k in file.keys() if k not in used and k not in IGNORED_KEYS and k not in unused_text
                and not k.startswith(EMA_PREFIX)]
    ema_line = f"yes, {len(ema):,} tensors (load with use_ema=True)" if ema else "no"
    lines.append(f"  EMA copy:   {ema_line}")
    lines.append(f"  allowed, not loaded: {len(ignored)} ({key_list(ignored, 4) or 'none'})")
    if METADATA_KEY not in file.metadata:
        prediction, reason = choose_prediction_type(file.path, kind)
        lines.append(f"  prediction: {prediction} ({reason})")
    if METADATA_KEY in file.metadata:
        try:
            config_from_metadata(file.metadata, file.path)
            lines.append(f"  config (metadata): {file.metadata[METADATA_KEY]}")
        except CheckpointError as error:   # shown, not raised: saying what is wrong is inspect's job
            lines.append(f"  config (metadata): INVALID, loading refuses it: {str(error).partition(': ')[2]}")
    lines.append(f"  unmapped:   {len(unmapped)}"
                 + (f" — {key_list(unmapped)}" if unmapped else " (every tensor accounted for)"))
    return lines


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _count(file: TensorFile, keys: Iterable[str]) -> int:
    return sum(_numel(file.shapes[k]) for k in keys)


def _dtypes(file: TensorFile, keys: Iterable[str]) -> str:
    return "/".join(sorted({file.dtypes[k] for k in keys})) or "-"
